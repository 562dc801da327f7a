"""The official ConvNeXt segmenters whole (issue 21): an `upernet_convnext_*` file in the mmseg 0.x layout loads
every tensor and computes what mmseg computes, in whole and slide inference; ours converts to that layout and
back bit-exactly.

The reference is the official code, transcribed below with its sources named (mmseg and mmcv cannot run here):
the official backbone's forward (ConvNeXt `semantic_segmentation/backbone/convnext.py`), mmcv's ConvModule,
mmseg 0.x `PPM` / `UPerHead` / `FCNHead` / `BaseDecodeHead.cls_seg` and `EncoderDecoder.slide_inference`.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import run_main
from torch import nn

from convnext.dense import ConvNeXtBackbone, create_segmenter, official_state_dict
from convnext.eval.dense import load_segmenter
from convnext.weights.dense_official import segmenter_from_official, segmenter_to_official

NAME, DEPTHS, DIMS = "convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768)


# --- the reference, transcribed ---------------------------------------------------------------------------
def _ln_channels_first(x, w, b, eps=1e-6):  # official LayerNorm, data_format="channels_first"
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return w[:, None, None] * x + b[:, None, None]


def official_backbone(sd, x):
    """semantic_segmentation/backbone/convnext.py, ConvNeXt.forward_features (out_indices 0..3), over `backbone.*`."""
    outs = []
    for i in range(4):
        d = f"backbone.downsample_layers.{i}."
        if i == 0:
            x = F.conv2d(x, sd[d + "0.weight"], sd[d + "0.bias"], stride=4)
            x = _ln_channels_first(x, sd[d + "1.weight"], sd[d + "1.bias"])
        else:
            x = _ln_channels_first(x, sd[d + "0.weight"], sd[d + "0.bias"])
            x = F.conv2d(x, sd[d + "1.weight"], sd[d + "1.bias"], stride=2)
        for j in range(DEPTHS[i]):
            p = f"backbone.stages.{i}.{j}."
            y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1])
            y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), sd[p + "norm.weight"], sd[p + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])),
                         sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
            x = x + (sd[p + "gamma"] * y).permute(0, 3, 1, 2)
        outs.append(_ln_channels_first(x, sd[f"backbone.norm{i}.weight"], sd[f"backbone.norm{i}.bias"]))
    return outs


def resize(x, size):  # mmseg.ops.resize (align_corners=False in every official config)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvModule(nn.Module):  # mmcv.cnn.ConvModule with norm_cfg SyncBN / BN and ReLU: conv (bias=False), bn, relu
    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):  # mmseg/models/decode_heads/psp_head.py
    def __init__(self, pool_scales, in_channels, channels):
        super().__init__()
        for scale in pool_scales:
            self.append(nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1)))

    def forward(self, x):
        return [resize(ppm(x), x.shape[2:]) for ppm in self]


class UPerHead(nn.Module):  # mmseg/models/decode_heads/uper_head.py (0.x), with BaseDecodeHead's dropout + conv_seg
    def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(0.1)

    def psp_forward(self, inputs):
        x = inputs[-1]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))

    def forward(self, inputs):
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(inputs))
        levels = len(laterals)
        for i in range(levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        fpn_outs = [self.fpn_convs[i](laterals[i]) for i in range(levels - 1)]
        fpn_outs.append(laterals[-1])
        for i in range(levels - 1, 0, -1):
            fpn_outs[i] = resize(fpn_outs[i], fpn_outs[0].shape[2:])
        return self.conv_seg(self.dropout(self.fpn_bottleneck(torch.cat(fpn_outs, dim=1))))


class FCNHead(nn.Module):  # mmseg/models/decode_heads/fcn_head.py: num_convs=1, concat_input=False, in_index=2
    def __init__(self, in_channels, channels, num_classes):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1))
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.dropout = nn.Dropout2d(0.1)

    def forward(self, inputs):
        return self.conv_seg(self.dropout(self.convs(inputs[2])))


def encode_decode(sd, decode_head, img):  # mmseg EncoderDecoder.encode_decode
    return resize(decode_head(official_backbone(sd, img)), img.shape[2:])


def slide_inference(sd, decode_head, img, crop, stride, num_classes):  # mmseg EncoderDecoder.slide_inference
    h_stride = w_stride = stride
    h_crop = w_crop = crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, num_classes, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_seg_logit = encode_decode(sd, decode_head, img[:, :, y1:y2, x1:x2])
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


# --- an official file, with random weights and BN statistics ---------------------------------------------------
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(0)
    backbone = ConvNeXtBackbone(NAME)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    decode, aux = UPerHead(list(DIMS), 512, 7).eval(), FCNHead(DIMS[2], 256, 7).eval()
    with torch.no_grad():
        for m in (*decode.modules(), *aux.modules()):
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
                m.num_batches_tracked.fill_(160000)
    sd = official_state_dict(backbone, {**{f"decode_head.{k}": v for k, v in decode.state_dict().items()},
                                        **{f"auxiliary_head.{k}": v for k, v in aux.state_dict().items()}})
    path = tmp_path_factory.mktemp("official") / "upernet_convnext_tiny_1k_512x512.pth"
    classes = ("wall", "building", "sky", "floor", "tree", "ceiling", "road")
    torch.save({"state_dict": sd, "meta": {"CLASSES": classes, "iter": 160000}}, path)
    return {"path": path, "sd": sd, "decode": decode, "aux": aux, "classes": list(classes)}


def test_every_tensor_of_an_official_upernet_loads_and_the_logits_are_mmsegs(official):
    model = create_segmenter(NAME, 7, pretrained=official["path"]).eval()
    ours = model.state_dict()
    assert set(segmenter_from_official(official["sd"])) == set(ours)  # nothing unused, nothing missing
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        want = encode_decode(official["sd"], official["decode"], x)
        got = model(x)
        assert got.shape == (1, 7, 96, 128) and (got - want).abs().max().item() <= 1e-4
        aux_want = official["aux"](official_backbone(official["sd"], x))
        aux_got = model.aux_head(model.backbone(x)[2])
        assert (aux_got - aux_want).abs().max().item() <= 1e-4
        model.test_mode, model.crop_size, model.stride = "slide", 64, 48  # 2 x 3 overlapping windows
        want = slide_inference(official["sd"], official["decode"], x, 64, 48, 7)
        assert (model(x) - want).abs().max().item() <= 1e-4


def test_an_official_upernet_file_is_a_segmenter_with_its_classes_and_the_official_test(official):
    model, spec = load_segmenter(official["path"])
    assert spec["classes"] == official["classes"] and spec["model_name"] == NAME and spec["aux_head"]
    assert (spec["test_mode"], spec["crop_size"], spec["stride"], spec["input_size"]) == ("slide", 512, 341, 512)
    assert (model.test_mode, model.crop_size, model.stride) == ("slide", 512, 341)
    ref = create_segmenter(NAME, 7, pretrained=official["path"])
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_ours_to_official_and_back_is_bit_exact(official, tmp_path, capsys):
    sd = official["sd"]
    again = segmenter_to_official(segmenter_from_official(sd))
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    code, _, err = run_main(capsys, "convert", official["path"], tmp_path / "ours.safetensors")
    assert code == 0, err
    code, _, err = run_main(capsys, "convert", tmp_path / "ours.safetensors", tmp_path / "back.pth", "--to",
                            "official-seg")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back["meta"]["CLASSES"]) == official["classes"]  # as mmcv saves it: state_dict + meta
    assert back["state_dict"].keys() == sd.keys() and all(torch.equal(back["state_dict"][k], sd[k]) for k in sd)
    model, spec = load_segmenter(tmp_path / "back.pth")
    assert spec["classes"] == official["classes"] and spec["test_mode"] == "slide"


def test_an_official_file_that_is_not_whole_or_another_backbone_is_refused(official, tmp_path, caplog):
    sd = dict(official["sd"])
    sd["decode_head.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "extra.pth")
    with pytest.raises(Exception, match="decode_head.extra.weight is not a tensor of the mmseg UperNet layout"):
        create_segmenter(NAME, 7, pretrained=tmp_path / "extra.pth")
    sd = dict(official["sd"])
    del sd["decode_head.fpn_convs.1.bn.running_var"]
    torch.save({"state_dict": sd}, tmp_path / "missing.pth")
    with pytest.raises(Exception, match="missing"):
        create_segmenter(NAME, 7, pretrained=tmp_path / "missing.pth")
    with pytest.raises(Exception, match="is an UperNet on convnext_tiny, not convnext_small"):
        create_segmenter("convnext_small", 7, pretrained=official["path"])
    with caplog.at_level("INFO"):
        new = create_segmenter(NAME, 3, pretrained=official["path"])  # fine-tuning to 3 classes
    assert "every tensor loaded but the classifiers" in caplog.text
    assert torch.equal(new.decode_head.fuse[1].running_mean,
                       official["sd"]["decode_head.fpn_bottleneck.bn.running_mean"])
    assert new.decode_head.cls.weight.shape[0] == 3


def rescale_size(old_size, scale):  # mmcv/image/geometric.py rescale_size + _scale_size (keep_ratio=True)
    w, h = old_size
    max_long_edge, max_short_edge = max(scale), min(scale)
    scale_factor = min(max_long_edge / max(h, w), max_short_edge / min(h, w))
    return int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)


@pytest.mark.slow
def test_segment_eval_of_an_official_file_follows_mmsegs_test_pipeline(official, tmp_path, capsys):
    """mmseg's ADE20K test: Resize(img_scale=(2048, 512), keep_ratio) -> slide 512/341 -> logits resized to
    the original image -> mIoU at full resolution."""
    import json

    import numpy as np
    from PIL import Image

    from convnext.eval.dense import segmentation_scores

    rng = np.random.default_rng(0)
    confusion = torch.zeros(7, 7, dtype=torch.long)
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    for i, (h, w) in enumerate(((120, 200), (150, 110))):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 7, (h, w), dtype=np.uint8)
        mask[:5] = 255
        Image.fromarray(img).save(tmp_path / "images" / "validation" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "annotations" / "validation" / f"{i}.png")
        nw, nh = rescale_size((w, h), (2048, 512))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False).round().clamp(0, 255) / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        with torch.no_grad():
            logits = slide_inference(official["sd"], official["decode"], x, 512, 341, 7)
        pred = resize(logits, (h, w)).argmax(1)[0]
        truth = torch.from_numpy(mask.astype(np.int64))
        keep = truth != 255
        confusion += torch.bincount(truth[keep] * 7 + pred[keep], minlength=49).view(7, 7)
    want = segmentation_scores(confusion, official["classes"])
    code, out, err = run_main(capsys, "segment", "eval", "--checkpoint", official["path"], "--data", tmp_path, "--json")
    assert code == 0, err
    got = json.loads(out)
    # (the resized pixels may differ by one grey level from a float-rounded resize: a few pixels flip)
    assert got["count"] == 2 and got["mIoU"] == pytest.approx(want["mIoU"], abs=2e-4)
    assert got["aAcc"] == pytest.approx(want["aAcc"], abs=2e-4)
