"""ConvNeXt as a backbone: torchvision detectors, UperNet, COCO / ADE20K data, metrics, dense tasks on the engine."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_same_run, run_cli, sigkill_when
from PIL import Image

import convnext
from convnext.data.scenes import SceneSpec, write_scenes
from convnext.dense import ConvNeXtBackbone, ConvNeXtFPN, create_detector, create_segmenter, official_state_dict
from convnext.train.optim import dense_param_groups
from convnext.weights import from_ours

pytest.importorskip("pycocotools")

SMALL = SceneSpec(min_side=96, max_side=128, min_objects=1, max_objects=2, min_garment=36, max_garment=64)


def cli(*args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "convnext", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900, **kw)


@pytest.fixture(scope="module")
def det_scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes") / "detect", "detect", n_train=8, n_val=4, spec=SMALL)


@pytest.fixture(scope="module")
def seg_scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes") / "segment", "segment", n_train=8, n_val=4, spec=SMALL)


# --- backbone -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [64, 100, 161, 224])
def test_backbone_strides_and_channels_at_any_input_size(size):
    b = ConvNeXtBackbone("convnext_atto")
    feats = b(torch.randn(1, 3, size, size))
    assert [f.shape[1] for f in feats] == b.channels == [40, 80, 160, 320]
    # each stage: a stride-4 stem, then stride-2 downsamplings (floor division, as the convolutions do)
    want, s = [], size // 4
    for _ in range(4):
        want.append(s)
        s //= 2
    assert [f.shape[-1] for f in feats] == want and b.strides == [4, 8, 16, 32]
    fpn = ConvNeXtFPN("convnext_atto")
    out = fpn(torch.randn(1, 3, size, size))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert all(v.shape[1] == fpn.out_channels == 256 for v in out.values())
    assert [out[k].shape[-1] for k in "0123"] == want


def test_frozen_stages_freeze_the_stem_and_the_first_stages():
    b = ConvNeXtBackbone("convnext_atto", frozen_stages=2)
    frozen = {n.split(".")[1] + ("." + n.split(".")[2] if n.startswith("body.stages") else "")
              for n, p in b.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "stages.0", "stages.1"}
    assert all(p.requires_grad for n, p in b.named_parameters() if n.startswith(("body.stages.2", "norm")))


@pytest.mark.parametrize("arch", ["maskrcnn", "fasterrcnn", "retinanet", "fcos"])  # cascade: test_official_dense
def test_each_torchvision_detector_trains_and_predicts_on_the_convnext_fpn(arch):
    model = create_detector("convnext_atto", 3, arch=arch, min_size=128, max_size=160)
    images = [torch.rand(3, 128, 150), torch.rand(3, 140, 128)]
    masks = torch.zeros(2, 128, 150, dtype=torch.uint8)
    masks[0, 10:50, 20:60] = masks[1, 60:100, 70:120] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10, 60, 50], [70, 60, 120, 100]]), "labels": torch.tensor([1, 3]),
                "masks": masks}, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                  "masks": torch.zeros(0, 140, 128, dtype=torch.uint8)}]
    losses = model.train()(images, targets)
    from convnext.dense.detection import LOSS_NAMES

    assert set(losses) == set(LOSS_NAMES[arch]) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.backbone.body.stem.conv.weight.grad is not None
    with torch.no_grad():
        out = model.eval()(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])
    assert ("masks" in out[0]) == (arch == "maskrcnn")


def test_the_detectors_have_the_published_sizes():
    """ConvNeXt-T's COCO detectors as the official README counts them: Mask R-CNN 48M parameters, Cascade Mask
    R-CNN 86M (3 stages of 4conv1fc box heads and mask heads)."""
    with torch.device("meta"):
        mask = create_detector("convnext_tiny", 80, arch="maskrcnn")
        cascade = create_detector("convnext_tiny", 80, arch="cascade_maskrcnn")
    assert round(sum(p.numel() for p in mask.parameters()) / 1e6) == 48
    assert round(sum(p.numel() for p in cascade.parameters()) / 1e6) == 86
    assert len(cascade.roi_heads.box_head) == len(cascade.roi_heads.mask_head) == 3


def test_roi_pooler_scales_are_the_strides_whatever_the_first_image():
    """torchvision would infer them from the first batch (and guess wrong for a 65-px image padded to 96)."""
    model = create_detector("convnext_atto", 3, min_size=65, max_size=65).eval()
    with torch.no_grad():
        model([torch.rand(3, 65, 65)])
    assert model.roi_heads.box_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert model.roi_heads.mask_roi_pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    assert (model.roi_heads.box_roi_pool.map_levels.k_min, model.roi_heads.box_roi_pool.map_levels.k_max) == (2, 5)


def test_heads_are_sized_for_the_input():
    small = create_detector("convnext_atto", 10, min_size=160, max_size=256)
    coco = create_detector("convnext_atto", 10, min_size=800, max_size=1333)
    assert small.roi_heads.fg_bg_sampler.batch_size_per_image == 128 and small.rpn._post_nms_top_n["training"] == 300
    assert small.roi_heads.box_head.fc6.out_features == 256
    assert coco.roi_heads.fg_bg_sampler.batch_size_per_image == 512 and coco.rpn._post_nms_top_n["training"] == 2000
    assert coco.roi_heads.box_head.fc6.out_features == 1024
    assert coco.rpn.anchor_generator.sizes[0] == (32,) and small.rpn.anchor_generator.sizes[0] == (8,)
    custom = create_detector("convnext_atto", 10, min_size=160, box_batch_size_per_image=64, representation_size=512)
    assert custom.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert custom.roi_heads.box_head.fc6.out_features == 512


def test_segmenter_upernet_as_the_official_config():
    model = create_segmenter("convnext_atto", 11)
    head = model.decode_head
    assert [m[0].output_size for m in head.ppm.pools] == [1, 2, 3, 6]
    assert head.cls.in_channels == 512 and head.dropout.p == 0.1 and head.fuse[0].in_channels == 4 * 512
    assert model.aux_head.conv[0].in_channels == 160 and model.aux_head.conv[0].out_channels == 256
    x, target = torch.randn(2, 3, 96, 130), torch.randint(0, 11, (2, 96, 130))
    target[0, :10] = 255
    assert model.eval()(x).shape == (2, 11, 96, 130)
    losses = model.train()(x, target)
    assert set(losses) == {"loss_seg", "loss_aux"}
    # the auxiliary loss is 0.4 x the cross-entropy of the auxiliary head
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        feats = model.backbone(x)
        aux = torch.nn.functional.interpolate(model.aux_head(feats[2]), size=x.shape[-2:], mode="bilinear")
        want = 0.4 * torch.nn.functional.cross_entropy(aux, target, ignore_index=255)
        assert model(x, target)["loss_aux"].item() == pytest.approx(want.item(), rel=1e-5)
    assert create_segmenter("convnext_atto", 5, head="fpn", aux_head=False).eval()(x).shape == (2, 5, 96, 130)


# --- checkpoints ----------------------------------------------------------------------------------
def test_official_det_seg_checkpoint_layout_round_trips_bit_exactly(tmp_path, caplog):
    src = ConvNeXtBackbone("convnext_atto")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    rest = {"neck.lateral_convs.0.conv.weight": torch.randn(256, 40, 1, 1), "rpn_head.rpn_conv.bias": torch.randn(256)}
    sd = official_state_dict(src, rest)
    assert "backbone.downsample_layers.0.0.weight" in sd and "backbone.stages.2.5.pwconv1.weight" in sd
    assert "backbone.norm3.weight" in sd
    torch.save({"state_dict": sd, "meta": {"epoch": 36}}, tmp_path / "mask_rcnn_convnext_atto.pth")
    with caplog.at_level("INFO"):
        loaded = ConvNeXtBackbone("convnext_atto", pretrained=tmp_path / "mask_rcnn_convnext_atto.pth")
    assert "2 neck/head tensors not used" in caplog.text
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # through the detector factory too
    det = create_detector("convnext_atto", 2, pretrained=tmp_path / "mask_rcnn_convnext_atto.pth", min_size=128)
    assert torch.equal(det.backbone.backbone.norm2.weight, src.norm2.weight)
    # a backbone missing a key fails loudly (strict)
    del sd["backbone.stages.1.0.dwconv.bias"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(Exception, match="missing"):
        ConvNeXtBackbone("convnext_atto", pretrained=tmp_path / "broken.pth")


def test_classification_checkpoint_initialises_the_backbone(tmp_path):
    cls = convnext.create_model("convnext_atto", num_classes=10)
    convnext.save_checkpoint(cls, tmp_path / "cls.safetensors")
    b = ConvNeXtBackbone("convnext_atto", pretrained=tmp_path / "cls.safetensors")
    assert torch.equal(b.body.stages[3].blocks[1].pwconv2.weight, cls.stages[3].blocks[1].pwconv2.weight)
    assert torch.equal(b.norm0.weight, torch.ones(40))  # new norms start at identity, as the official code


# --- layer decay: the official constructor's assignment ----------------------------------------------
def _official_layer_wise(name, num_max_layer):  # object_detection/mmcv_custom/layer_decay_optimizer_constructor.py
    if name.startswith("backbone.downsample_layers"):
        return {0: 0, 1: 2, 2: 3, 3: num_max_layer}[int(name.split(".")[2])]
    if name.startswith("backbone.stages"):
        s, b = int(name.split(".")[2]), int(name.split(".")[3])
        return {0: 1, 1: 2, 2: 3 + b // 3, 3: num_max_layer}[s]
    return num_max_layer + 1


def _official_stage_wise(name, num_max_layer):
    if name.startswith("backbone.downsample_layers"):
        return 0
    if name.startswith("backbone.stages"):
        return int(name.split(".")[2]) + 1
    return num_max_layer - 1


def _official_names(backbone, prefix):
    """our parameter name -> the official det/seg name (`backbone.` + official layout), via the converter."""
    ours = backbone.body.state_dict()
    mapping = {f"{prefix}body.{a}": f"backbone.{b}" for a, b in zip(ours, from_ours(ours, "official"), strict=True)}
    return mapping | {f"{prefix}norm{i}.{p}": f"backbone.norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}


@pytest.mark.parametrize("size,num_layers", [("tiny", 6), ("base", 12)])
def test_layer_decay_groups_equal_the_official_constructors(size, num_layers):
    with torch.device("meta"):
        det = create_detector(f"convnext_{size}", 80, min_size=800)
        seg = create_segmenter(f"convnext_{size}", 150)
    depths = {"tiny": (3, 3, 9, 3), "base": (3, 3, 27, 3)}[size]
    for model, kind, prefix, official, n_cfg in (
            (det, "layer_wise", "backbone.backbone.", _official_layer_wise, num_layers),
            (seg, "stage_wise", "backbone.", _official_stage_wise, num_layers)):  # upernet_convnext_tiny: 6
        groups = dense_param_groups(model, 0.05, 0.8, kind, depths=depths)
        names = _official_names(model.backbone.backbone if kind == "layer_wise" else model.backbone, prefix)
        assert sum(len(g["names"]) for g in groups) == sum(1 for _ in model.parameters())
        for g in groups:
            for name, p in zip(g["names"], g["params"], strict=True):
                off = names.get(name, "neck_or_head." + name)  # everything outside the backbone: head rate
                if kind == "layer_wise":
                    lid = official(off, n_cfg)
                    want = 0.8 ** (n_cfg + 2 - lid - 1)
                else:
                    lid = official(off, n_cfg + 2)
                    want = 0.8 ** (n_cfg + 2 - lid - 1)
                assert g["lr_scale"] == pytest.approx(want), (name, off)
                no_decay = p.ndim == 1 or off.endswith(".bias")
                assert g["weight_decay"] == (0.0 if no_decay else 0.05), name


# --- data ---------------------------------------------------------------------------------------------
def _coco(tmp_path, annotations, categories=None, images=None):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    data = {"images": images or [{"id": 7, "file_name": "a.jpg", "height": 60, "width": 80}],
            "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 42, "name": "dog"}, {"id": 7, "name": "cow"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", tmp_path / "img"


def test_non_contiguous_category_ids_map_to_labels_and_back(tmp_path):
    from convnext.data.coco import CocoDetection
    from convnext.eval.dense import coco_ap, detections_to_coco

    anns = [{"id": 1, "image_id": 7, "category_id": 42, "bbox": [10, 5, 20, 30], "area": 600, "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 35, 10, 35]]},
            {"id": 2, "image_id": 7, "category_id": 7, "bbox": [40, 20, 30, 30], "area": 900, "iscrowd": 0,
             "segmentation": [[40, 20, 70, 20, 70, 50, 40, 50]]}]
    ds = CocoDetection(*_coco(tmp_path, anns))
    assert ds.cat_ids == [3, 7, 42] and ds.classes == ["cat", "cow", "dog"]
    _, target, _ = ds[0]
    assert target["labels"].tolist() == [3, 2]  # 42 -> 3, 7 -> 2
    assert target["masks"].shape == (2, 60, 80) and int(target["masks"][0].sum()) == 20 * 30  # the polygon, rasterised
    # the ground truth as detections: back to the original ids, AP 1
    out = {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
           "scores": torch.tensor([0.9, 0.8]), "masks": target["masks"][:, None].float()}
    results = detections_to_coco(out, 7, ds.cat_ids)
    assert [r["category_id"] for r in results] == [42, 7]
    assert coco_ap(ds.coco_gt(), results, "bbox")["bbox_mAP"] == pytest.approx(1.0)
    assert coco_ap(ds.coco_gt(), results, "segm")["segm_mAP"] == pytest.approx(1.0)


def test_bad_annotations_are_clear_errors_or_reported_skips(tmp_path, caplog, capsys):
    from convnext.data import DataError
    from convnext.data.coco import CocoDetection

    good = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 30], "iscrowd": 0}
    bad = [{**good, "id": 2, "bbox": [100, 100, 10, 10]},  # outside the 80x60 image
           {**good, "id": 3, "bbox": [10, 10, 0, 5]},  # zero area
           {**good, "id": 4, "segmentation": {"size": [30, 30], "counts": "abc"}},  # mask of the wrong size
           {**good, "id": 5, "bbox": [70, 50, 30, 30]}]  # partly outside: clipped, kept
    with caplog.at_level("WARNING"):
        ds = CocoDetection(*_coco(tmp_path, [good, *bad]))
    assert "skipped 3 annotation(s)" in caplog.text and "zero-area" in caplog.text and "wrong size" in caplog.text
    assert ds[0][1]["boxes"].tolist() == [[10, 5, 30, 35], [70, 50, 80, 60]]
    with pytest.raises(DataError, match="annotation 9 has category_id 5, not among the categories"):
        CocoDetection(*_coco(tmp_path, [{**good, "id": 9, "category_id": 5}]))
    with pytest.raises(DataError, match="file not found: .*missing.jpg"):
        CocoDetection(*_coco(tmp_path, [good], images=[{"id": 7, "file_name": "missing.jpg", "height": 60,
                                                         "width": 80}]))
    # through the command line: one line, exit 2, no traceback
    ann, img = _coco(tmp_path, [{**good, "category_id": 5}])
    r = run_cli(capsys, "detect", "train", "--data", tmp_path, "--train-ann", ann, "--train-images", img, "--val-ann",
                ann, "--val-images", img, "--output", tmp_path.with_name(tmp_path.name + "-run"), "--model",
                "convnext_atto")
    assert r.returncode == 2 and "not among the categories" in r.stderr and "Traceback" not in r.stderr


def test_segmentation_data_metrics_and_padding(tmp_path):
    from convnext.data.segdata import SegmentationFolder, collate_segmentation
    from convnext.eval.dense import segmentation_scores

    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / split / "x.jpg")
        Image.fromarray(np.array([[0, 1, 2, 3, 0, 0]] * 4, np.uint8)).save(tmp_path / "annotations" / split / "x.png")
    ds = SegmentationFolder(tmp_path, "train", reduce_zero_label=True)
    _, mask, _ = ds[0]
    assert mask[0].tolist() == [255, 0, 1, 2, 255, 255]
    batch = collate_segmentation([(torch.ones(3, 4, 6), mask, 0), (torch.ones(3, 40, 3), torch.zeros(40, 3).long(), 1)])
    # different sizes: each padded to its own multiple of 32, so a prediction never depends on its batch-mates
    assert [x.shape for x in batch.inputs] == [(1, 3, 32, 32), (1, 3, 64, 32)]
    assert (batch.targets[0][0, 4:] == 255).all() and batch.inputs[0][0, :, 5:].sum() == 0
    same = collate_segmentation([(torch.ones(3, 40, 40), torch.zeros(40, 40).long(), i) for i in range(3)])
    assert same.inputs.shape == (3, 3, 64, 64) and (same.targets[:, 40:] == 255).all()
    confusion = torch.tensor([[5, 1, 0], [2, 2, 0], [0, 0, 0]])  # class 2: in neither truth nor prediction
    s = segmentation_scores(confusion, ["a", "b", "c"])
    assert s["mIoU"] == pytest.approx((5 / 8 + 2 / 5) / 2) and s["mAcc"] == pytest.approx((5 / 6 + 2 / 4) / 2)
    assert s["aAcc"] == pytest.approx(7 / 10) and s["per_class_iou"]["c"] is None


def test_scene_generator_is_deterministic_and_annotations_are_exact(tmp_path):
    from pycocotools import mask as mask_utils

    a = write_scenes(tmp_path / "a", "detect", n_train=3, n_val=2, seed=5, spec=SMALL)
    b = write_scenes(tmp_path / "b", "detect", n_train=3, n_val=2, seed=5, spec=SMALL)
    assert (a / "annotations/instances_train.json").read_text() == (b / "annotations/instances_train.json").read_text()
    assert (a / "train/000001.jpg").read_bytes() == (b / "train/000001.jpg").read_bytes()
    data = json.loads((a / "annotations/instances_val.json").read_text())
    for ann in data["annotations"]:
        m = mask_utils.decode(ann["segmentation"])
        ys, xs = np.nonzero(m)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["area"] == m.sum() and 1 <= ann["category_id"] <= 10
    seg = write_scenes(tmp_path / "s", "segment", n_train=3, n_val=2, seed=5, spec=SMALL)
    assert (seg / "classes.txt").read_text().splitlines()[0] == "background"
    assert np.asarray(Image.open(seg / "annotations/validation/000000.png")).max() <= 10


# --- training on the engine ----------------------------------------------------------------------------
def _det_cfg(data, out, **kw):
    from convnext.train.detection import DetectConfig

    base = dict(model="convnext_atto", data=str(data), output=str(out), epochs=2, batch_size=2, input_size=96,
                lr=5e-4, warmup_epochs=0, workers=0, progress=False, proposals=100, rois_per_image=32)
    return DetectConfig(**(base | kw))


@pytest.mark.slow
def test_detection_sigkill_then_resume_is_bitwise(det_scenes, tmp_path):
    from convnext.weights import read_checkpoint

    def cmd(out, *extra):
        return [sys.executable, "-m", "convnext", "detect", "train", "--model", "convnext_atto",
                "--data", str(det_scenes), "--output", str(out), "--epochs", "2", "--batch-size", "2",
                "--input-size", "96", "--lr", "5e-4",
                "--warmup-epochs", "0", "--workers", "0", "--threads", "1", "--proposals", "100",
                "--rois-per-image", "32", "--save-every-steps", "1", "--no-progress", *extra]

    assert subprocess.run(cmd(tmp_path / "ref"), capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "killed"
    sigkill_when(cmd(out), out / "checkpoints" / "step-00000006.pt")  # mid epoch 2 (4 steps per epoch)
    r = subprocess.run(cmd(out, "--resume", "auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    a, b = read_checkpoint(tmp_path / "ref" / "last.pt")[0], read_checkpoint(out / "last.pt")[0]
    assert a["step"] == 8
    assert_same_run(a, b)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"train_loss", "train_loss_mask", "bbox_mAP", "bbox_mAP_50", "segm_mAP",
                                "segm_mAP_50"} <= set(lines[-1])


def _held_out_detection(model, ds):
    """On each scene of `ds` (one object each): whether the RPN's 10 best proposals hold the object (IoU >= 0.5),
    and the training loss of the scene (the model in train mode, no gradients)."""
    from torchvision.ops import box_iou

    recall, loss = [], []
    for i in range(len(ds)):
        img, target, _ = ds[i]
        with torch.no_grad():
            model.eval()
            images, _ = model.transform([img])
            proposals, _ = model.rpn(images, model.backbone(images.tensors))
            (h, w), (H, W) = images.image_sizes[0], img.shape[-2:]
            best = proposals[0][:10] * torch.tensor([W / w, H / h, W / w, H / h])
            recall.append(float(box_iou(best, target["boxes"]).max() >= 0.5))
            model.train()
            loss.append(sum(model([img], [{k: target[k] for k in ("boxes", "labels", "masks")}]).values()).item())
    model.eval()
    return sum(recall) / len(ds), sum(loss) / len(ds)


@pytest.mark.slow
def test_detection_learns_on_held_out_scenes_and_ddp_evaluation_equals_one_process(tmp_path, capsys):
    """Mask R-CNN trained from scratch for 120 steps on 160 small scenes of one garment (trousers), judged on
    8 held-out scenes (other garments, other placements): its RPN finds the objects there (an untrained one
    finds none), its loss there falls far below the untrained model's, box mAP@0.5 > 0 where the untrained
    model's is 0, and predict draws the held-out object. The 2-process run's distributed evaluation equals
    `detect eval` of the same weights in one process. (Box AP that compares with published numbers needs the
    demo's budget: 0.245 mAP@0.5 in 25 minutes.)"""
    from convnext.data.coco import CocoDetection, detection_transform
    from convnext.eval.dense import load_detector

    data = write_scenes(tmp_path / "scenes", "detect", n_train=160, n_val=8, spec=SceneSpec(
        min_side=48, max_side=56, min_objects=1, max_objects=1, min_garment=24, max_garment=32, classes=(1,)))
    r = cli("detect", "train", "--model", "convnext_atto", "--data", data, "--output", tmp_path / "run",
            "--eval-every", 6, "--epochs", 6, "--batch-size", 4, "--input-size", 48, "--ms-scale", 1, 1,
            "--lr", 2e-3, "--warmup-epochs", 1, "--workers", 0, "--threads", 1, "--proposals", 100,
            "--rois-per-image", 32, "--nproc", 2, "--no-progress", "--crop", 0, "--photometric", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    e = run_cli(capsys, "detect", "eval", "--checkpoint", tmp_path / "run" / "last.pt", "--data", data, "--json")
    assert e.returncode == 0, e.stderr[-2000:]
    one = json.loads(e.stdout)
    assert one["count"] == 8 and one["bbox_mAP"] == pytest.approx(lines[-1]["bbox_mAP"], abs=1e-9)
    assert one["segm_mAP_50"] == pytest.approx(lines[-1]["segm_mAP_50"], abs=1e-9)
    held_out = CocoDetection(data / "annotations/instances_val.json", data / "val", detection_transform(False))
    model, spec = load_detector(tmp_path / "run" / "last.pt")
    torch.manual_seed(0)
    untrained, _ = load_detector(tmp_path / "run" / "last.pt")
    untrained.load_state_dict(create_detector("convnext_atto", 10, min_size=48, max_size=spec["max_size"],
                                              **spec.get("options", {})).state_dict())
    (recall, loss), (recall0, loss0) = _held_out_detection(model, held_out), _held_out_detection(untrained, held_out)
    assert recall >= 0.375 and recall0 == 0.0, (recall, recall0)  # an untrained RPN: none
    assert loss < 0.3 * loss0, (loss, loss0)
    assert one["bbox_mAP_50"] > 0.005, one
    # predict on a held-out scene: drawn image and COCO results, its best box on the object's class
    p = run_cli(capsys, "detect", "predict", data / "val" / "000000.jpg", "--checkpoint",
                tmp_path / "run" / "best.safetensors", "--output", tmp_path / "pred", "--score-threshold", 0.05)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "pred" / "000000.png").is_file()
    results = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert results and all(r["file_name"].endswith("000000.jpg") for r in results)
    assert max(results, key=lambda r: r["score"])["category_id"] == 2  # Trouser (Fashion-MNIST class 1)
    again = run_cli(capsys, "detect", "predict", data / "val" / "000000.jpg", "--checkpoint",
                    tmp_path / "run" / "best.safetensors", "--output", tmp_path / "pred")
    assert again.returncode == 2 and "exists; pass --force" in again.stderr


@pytest.mark.slow
def test_segmentation_learns_on_the_engine(tmp_path, capsys):
    """The FPN head from scratch on 128 scenes of one large garment (trousers); judged on 8 held-out scenes
    against the untrained model and the majority baseline (measured on Zen 4: mIoU 0.69 vs 0.38, aAcc 0.85 vs
    0.75)."""
    from convnext.train import fit
    from convnext.train.segmentation import SegmentConfig, SegmentationTask

    seg_scenes = write_scenes(tmp_path / "scenes", "segment", n_train=128, n_val=8, spec=SceneSpec(
        min_side=48, max_side=56, min_objects=1, max_objects=1, min_garment=40, max_garment=48, classes=(1,)))
    cfg = SegmentConfig(model="convnext_atto", data=str(seg_scenes), output=str(tmp_path / "run"), epochs=10,
                        batch_size=8, input_size=48, scale=(1.0, 1.0), head="fpn", channels=32, lr=4e-3,
                        warmup_epochs=1, workers=0, threads=1, progress=False)
    s = fit(SegmentationTask(cfg))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "train_loss_seg", "train_loss_aux", "mIoU", "mAcc", "aAcc"} <= set(lines[-1])
    assert lines[-1]["train_loss"] < 0.7 * lines[0]["train_loss"]
    untrained = create_segmenter("convnext_atto", 11, head="fpn", channels=32)
    from convnext.data.segdata import SegmentationFolder, collate_segmentation, segmentation_transform
    from convnext.eval.dense import evaluate_segmentation
    from convnext.preprocess import IMAGENET_MEAN, IMAGENET_STD

    ds = SegmentationFolder(seg_scenes, "val", segmentation_transform(False, 48, IMAGENET_MEAN, IMAGENET_STD))
    base = evaluate_segmentation(untrained, torch.utils.data.DataLoader(ds, batch_size=4,
                                                                        collate_fn=collate_segmentation),
                                 torch.device("cpu"), 11)
    assert s["best"] > base["mIoU"] and lines[-1]["aAcc"] > base["aAcc"]
    # ... and beats the majority baseline on the held-out scenes (every pixel the most frequent class):
    # a head that learned only the background ties with it
    labels = torch.cat([ds[i][1].flatten() for i in range(len(ds))])
    labels = labels[labels != 255]
    counts = torch.bincount(labels, minlength=11).double()
    majority_acc = counts.max().item() / counts.sum().item()  # its aAcc; its mIoU is that / classes present
    present = int((counts > 0).sum())
    best = max(lines, key=lambda m: m["mIoU"])
    assert best["aAcc"] > majority_acc + 0.02 and best["mIoU"] > 1.5 * majority_acc / present
    r = run_cli(capsys, "segment", "eval", "--checkpoint", tmp_path / "run" / "best.safetensors", "--data", seg_scenes,
                "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["mIoU"] == pytest.approx(s["best"], abs=1e-9)
    p = run_cli(capsys, "segment", "predict", seg_scenes / "images" / "validation", "--checkpoint",
                tmp_path / "run" / "best.safetensors", "--output", tmp_path / "pred")
    assert p.returncode == 0, p.stderr[-2000:]
    mask = np.asarray(Image.open(tmp_path / "pred" / "000000_mask.png"))
    assert mask.shape == np.asarray(Image.open(seg_scenes / "images/validation/000000.jpg")).shape[:2]


# --- every detector and the segmenter on the engine: train, resume to the bit, eval, predict -------------

def _dense_run(task, data, out, **kw):
    from convnext.train import fit
    from convnext.train.detection import DetectConfig, DetectionTask
    from convnext.train.segmentation import SegmentConfig, SegmentationTask

    common = dict(model="convnext_atto", data=str(data), output=str(out), epochs=2, batch_size=2, input_size=64,
                  lr=5e-4, warmup_epochs=0, workers=0, threads=1, progress=False, save_every_steps=1,
                  keep_checkpoints=99)
    if task == "segment":
        return fit(SegmentationTask(SegmentConfig(**{**common, "head": "fpn", "channels": 16, **kw})))
    return fit(DetectionTask(DetectConfig(**{**common, "proposals": 50, "rois_per_image": 16, "fpn_channels": 32,
                                             "box_head_width": 32, **kw})))


@pytest.fixture(scope="module")
def small_scenes(tmp_path_factory):
    spec = SceneSpec(min_side=64, max_side=72, min_objects=1, max_objects=2, min_garment=24, max_garment=40)
    root = tmp_path_factory.mktemp("small")
    return {t: write_scenes(root / t, t, n_train=4, n_val=2, spec=spec) for t in ("detect", "segment")}


@pytest.mark.parametrize("arch", ["cascade_maskrcnn", "fasterrcnn", "retinanet", "fcos"])
def test_every_detector_trains_resumes_bitwise_evaluates_and_predicts(small_scenes, tmp_path, capsys, arch):
    """Cascade Mask R-CNN, Faster R-CNN, RetinaNet and FCOS as Mask R-CNN: named losses on the engine; a run resumed from one of
    its mid-epoch checkpoints ends bitwise where the uninterrupted one does (the SIGKILL itself:
    test_detection_sigkill_then_resume_is_bitwise); `detect eval` reproduces the run's AP; predict writes."""
    from convnext.dense.detection import LOSS_NAMES
    from helpers import run_main

    data = small_scenes["detect"]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    width = 64 if arch == "fcos" else 32  # (FCOS: GroupNorm of 32 groups in its head)
    _dense_run("detect", data, ref, arch=arch, fpn_channels=width)
    mid = ref / "checkpoints" / "step-00000003.pt"  # 2 steps an epoch: epoch 2, mid-way
    _dense_run("detect", data, resumed, arch=arch, fpn_channels=width, resume=str(mid))
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (ref, resumed))
    assert a["step"] == 4
    assert_same_run(a, b)
    line = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()][-1]
    assert {f"train_{n}" for n in LOSS_NAMES[arch]} | {"bbox_mAP", "bbox_mAP_50"} <= set(line)
    assert ("segm_mAP" in line) == (arch == "cascade_maskrcnn")  # the Mask R-CNNs' only
    code, out, err = run_main(capsys, "detect", "eval", "--checkpoint", ref / "last.pt", "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["bbox_mAP"] == pytest.approx(line["bbox_mAP"], abs=1e-9)
    code, out, err = run_main(capsys, "detect", "predict", data / "val", "--checkpoint", ref / "best.safetensors",
                              "--output", tmp_path / "pred", "--score-threshold", 0.0, "--json")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2
    assert isinstance(json.loads((tmp_path / "pred" / "detections.json").read_text()), list)


def test_segmentation_resumes_bitwise_and_evaluates_as_it_trained(small_scenes, tmp_path, capsys):
    from helpers import run_main

    data = small_scenes["segment"]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    _dense_run("segment", data, ref)
    _dense_run("segment", data, resumed, resume=str(ref / "checkpoints" / "step-00000003.pt"))
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (ref, resumed))
    assert a["step"] == 4
    assert_same_run(a, b)
    line = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()][-1]
    code, out, err = run_main(capsys, "segment", "eval", "--checkpoint", ref / "last.pt", "--data", data, "--json")
    assert code == 0 and json.loads(out)["mIoU"] == pytest.approx(line["mIoU"], abs=1e-9), err


@pytest.mark.slow
def test_segmentation_on_two_processes_equals_one_process(small_scenes, tmp_path, capsys):
    data = small_scenes["segment"]
    args = ["segment", "train", "--model", "convnext_atto", "--data", data, "--epochs", 2, "--input-size", 64,
            "--lr", 5e-4, "--warmup-epochs", 0, "--workers", 0, "--threads", 1, "--no-progress", "--head", "fpn",
            "--channels", 16, "--photometric", 0, "--head-dropout", 0, "--scale", 1, 1]
    # (dropout draws per rank; no padding, so that each rank's mean over its pixels is the mean over all: the
    # loss is averaged per rank, as mmseg does)
    one = run_cli(capsys, *args, "--output", tmp_path / "one", "--batch-size", 4)
    assert one.returncode == 0, one.stderr[-2000:]
    two = cli(*args, "--output", tmp_path / "two", "--batch-size", 2, "--nproc", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("one", "two"))
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
        assert ha["mIoU"] == pytest.approx(hb["mIoU"], abs=1e-6)  # exact distributed evaluation
    # AdamW moves a weight whose gradient is float noise by up to lr per step whatever its size: most weights
    # agree to 1e-5, none by more than the two steps' lr
    close = torch.cat([((a["model"][k] - b["model"][k]).abs() <= 1e-5).flatten() for k in a["model"]
                       if a["model"][k].is_floating_point()])
    assert close.float().mean() > 0.95, close.float().mean()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=2 * 5e-4, rtol=0)


@pytest.mark.parametrize("recipe, task, want", [
    ("upernet_convnext_tiny_160k_ade20k", "segment",
     dict(model="convnext_tiny", head="upernet", input_size=512, scale=(0.5, 2.0), lr_base=1e-4, weight_decay=0.05,
          layer_decay=0.9, layer_decay_type="stage_wise", num_layers=6, drop_path_rate=0.4, schedule="poly",
          warmup_iters=1500, warmup_ratio=1e-6, min_lr=0.0, reduce_zero_label=True)),
    ("upernet_convnext_base_160k_ade20k", "segment", dict(num_layers=12, drop_path_rate=0.4)),
    ("mask_rcnn_convnext_tiny_3x_coco", "detect",
     dict(model="convnext_tiny", arch="maskrcnn", input_size=800, max_size=1333, ms_scale=(0.6, 1.0), lr_base=1e-4,
          layer_decay=0.95, layer_decay_type="layer_wise", num_layers=6, drop_path_rate=0.4, epochs=36,
          schedule="step", lr_steps=(27, 33), warmup_iters=500, warmup_ratio=1e-3, conventions="mmdet",
          crop_policy="detr", crop=0.5, ms_sizes=11)),
    ("cascade_mask_rcnn_convnext_tiny_3x_coco", "detect",
     dict(model="convnext_tiny", arch="cascade_maskrcnn", conventions="mmdet", lr_base=2e-4, layer_decay=0.7,
          layer_decay_type="layer_wise", num_layers=6, drop_path_rate=0.4, epochs=36, lr_steps=(27, 33))),
    ("cascade_mask_rcnn_convnext_small_3x_coco", "detect", dict(lr_base=2e-4, layer_decay=0.7, num_layers=12,
                                                                 drop_path_rate=0.6)),
    ("cascade_mask_rcnn_convnext_base_3x_coco", "detect", dict(lr_base=2e-4, layer_decay=0.8, num_layers=12,
                                                                drop_path_rate=0.7)),
])
def test_the_official_det_seg_recipes_are_packaged(recipe, task, want, tmp_path):
    """The values of the official configs (ConvNeXt object_detection/ and semantic_segmentation/configs)."""
    from convnext.cli import build_parser
    from convnext.tasks import get_task
    from convnext.train.config import from_args

    args = build_parser().parse_args([task, "train", "--config", recipe, "--data", str(tmp_path)])
    cfg = from_args(args, get_task(task).config)
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.lr_base * 16 / cfg.lr_base_batch == pytest.approx(want.get("lr_base", cfg.lr_base))  # at batch 16


def test_the_detection_demo_takes_the_detector_to_train(monkeypatch, capsys, tmp_path):
    """`convnext demo --task detect --arch cascade_maskrcnn` trains the packaged demo recipe with that detector
    (the run itself: the demo's own budget, not a unit test's); --arch is not the segmentation demo's."""
    from helpers import run_main

    from convnext.train import scenes_demo
    from convnext.train.config import recipe
    from convnext.train.detection import DetectConfig

    seen = {}

    def fake_run(spec, recipe_name, **kw):
        seen["cfg"] = recipe(recipe_name, spec.config, data=str(tmp_path / "d"), output=str(tmp_path / "o"),
                             **(kw["overrides"] or {}))
        seen["what"] = kw["what"](seen["cfg"])
        return {}

    monkeypatch.setattr(scenes_demo, "run", fake_run)
    code, _, err = run_main(capsys, "demo", "--task", "detect", "--arch", "cascade_maskrcnn", "--output", tmp_path)
    assert code == 0, err
    assert isinstance(seen["cfg"], DetectConfig) and seen["cfg"].arch == "cascade_maskrcnn"
    assert seen["what"] == "cascade_maskrcnn (Cascade Mask R-CNN)"
    code, _, err = run_main(capsys, "demo", "--task", "segment", "--arch", "cascade_maskrcnn", "--output", tmp_path)
    assert code == 2 and "--arch not for --task segment" in err
    code, _, err = run_main(capsys, "demo", "--task", "detect", "--arch", "yolo", "--output", tmp_path)
    assert code == 2 and "yolo" in err and "cascade_maskrcnn" in err


def test_the_official_detr_crop_policy_and_multi_scale_sizes():
    """The official COCO configs' AutoAugment branch (mmdet Resize to (400|500|600, 1333) + RandomCrop
    absolute_range (384, 600), allow_negative_crop) and their 11 training scales 480..800."""
    from torchvision import tv_tensors

    from convnext.data.coco import RandomRangeCrop, detection_transform
    from convnext.train.detection import train_sizes

    assert train_sizes(800, (0.6, 1.0), 11) == tuple(range(480, 801, 32))
    torch.manual_seed(0)
    img = tv_tensors.Image(torch.randint(0, 255, (3, 500, 700), dtype=torch.uint8))
    box = tv_tensors.BoundingBoxes(torch.tensor([[300.0, 200, 340, 260]]), format="XYXY", canvas_size=(500, 700))
    sizes = set()
    for _ in range(300):
        h, w = RandomRangeCrop(384, 600)(img, box)[0].shape[-2:]
        sizes |= {(h, w)}
        assert 384 <= h <= 500 and 384 <= w <= 600  # min(side, 600): the 500-px side bounds the height
    assert min(h for h, _ in sizes) <= 390 and max(h for h, _ in sizes) >= 495 and max(w for _, w in sizes) >= 590
    torch.manual_seed(1)
    crop = RandomRangeCrop(384, 600)
    params = crop.make_params([img, box])
    torch.manual_seed(1)
    _, moved = crop(img, box)
    want = torch.tensor([[300.0, 200, 340, 260]]) - torch.tensor([params["left"], params["top"]] * 2)
    assert torch.equal(moved.as_subclass(torch.Tensor), want.clamp(min=0).minimum(
        torch.tensor([params["width"], params["height"]] * 2)))  # shifted (and clipped) with the window
    t = detection_transform(True, crop=1.0, photometric=0.0, hflip=0.0, crop_policy="detr")
    short = set()
    for i in range(40):
        torch.manual_seed(i)
        out, _ = t(tv_tensors.Image(torch.zeros(3, 480, 640, dtype=torch.uint8)),
                   {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[10.0, 10, 600, 470]]), format="XYXY",
                                                      canvas_size=(480, 640)), "labels": torch.tensor([1])})
        h, w = out.shape[-2:]
        assert 384 <= h <= 600 and 384 <= w <= 600 and out.dtype == torch.float32
        short.add(min(h, w))
    assert len(short) > 5  # random windows
    with pytest.raises(ValueError, match="crop_policy must be one of iou, detr"):
        detection_transform(True, crop_policy="ssd")
