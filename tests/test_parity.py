"""Numerical parity with timm, torchvision and Hugging Face transformers, through our converters.

Reference models are randomly initialised and then perturbed (every parameter moved off its init,
so LayerScale, GRN, biases and norms all matter), saved in their own format, loaded through
`load_checkpoint` / `create_model(pretrained=...)`, and must give the same fp32 logits.
"""

import warnings

import pytest
import torch

import convnext
from convnext.models import MODELS
from convnext.weights import detect_format, from_ours, read_checkpoint

from helpers import perturb

TOL = 1e-4
BIG = {"convnext_xlarge", "convnextv2_huge", "convnext_large", "convnextv2_large", "convnext_base",
       "convnextv2_base", "convnext_small", "convnextv2_small"}
HIERARCHICAL = [n for n in MODELS if "isotropic" not in n]


@pytest.fixture
def timm():
    """timm, the parity reference (a test dependency); skipped per test, never for the whole file."""
    return pytest.importorskip("timm")


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _shapes(sd) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _assert_layout_maps(ref_sd, name: str, fmt: str) -> None:
    """On the meta device (shapes only, no weights): every tensor of the reference's own state dict maps
    onto ours with the right shape, nothing missing or left over, and our layout maps back to theirs."""
    from convnext.weights import to_ours
    from convnext.weights.loading import _layout_reshape

    with torch.device("meta"):
        ours = convnext.create_model(name, num_classes=11)
    got, want = _shapes(to_ours(ref_sd, fmt)[1]), _shapes(ours.state_dict())
    assert set(got) == set(want)
    assert all(got[k] == want[k] or _layout_reshape(k, got[k], want[k]) for k in want)
    assert set(from_ours(ours.state_dict(), fmt)) == set(ref_sd)


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_timm_parity(name, tmp_path, timm):
    """The same logits as timm (the small sizes, numerically); for the large sizes, whose blocks are the same
    code, the key and shape tables against timm's own model on the meta device."""
    if name in BIG:
        with torch.device("meta"):
            ref = timm.create_model(name, num_classes=11)
        _assert_layout_maps(ref.state_dict(), name, "timm")
        return
    ref = perturb(timm.create_model(name, num_classes=11))
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    ours = convnext.create_model(name, pretrained=path).eval()
    assert ours.num_classes == 11
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL
        # features_only: our stage outputs equal timm's intermediates
        feats = convnext.create_model(name, pretrained=path, features_only=True).eval()(x)
        ref_feats = ref.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == len(ref_feats) == 4
    for f, r in zip(feats, ref_feats, strict=True):
        assert f.shape == r.shape and _max_diff(f, r) <= TOL * max(1.0, r.abs().max().item())
    ours.set_fast_path(False)  # the textbook forward (the model file's own op sequence) equals timm as well
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_atto"])
def test_features_only_matches_timm_features_only(name, tmp_path, timm):
    ref = perturb(timm.create_model(name))
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    # timm loads the same local file into its own features_only wrapper.
    ref_feat = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth"))).eval()
    ours = convnext.create_model(name, pretrained=tmp_path / "w.pth", features_only=True).eval()
    assert ours.feature_info.channels() == ref_feat.feature_info.channels()
    assert ours.feature_info.reduction() == ref_feat.feature_info.reduction()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for f, r in zip(ours(x), ref_feat(x), strict=True):
            assert _max_diff(f, r) <= TOL


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_torchvision_parity(size, tmp_path):
    import torchvision

    if size != "tiny":  # the same blocks: key and shape tables against torchvision's own model, on meta
        with torch.device("meta"):
            ref = getattr(torchvision.models, f"convnext_{size}")(num_classes=11)
        _assert_layout_maps(ref.state_dict(), f"convnext_{size}", "torchvision")
        return
    ref = perturb(getattr(torchvision.models, f"convnext_{size}")(num_classes=13))
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    ours = convnext.create_model(f"convnext_{size}", pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL
    # and back: our weights exported in torchvision's layout load into torchvision strictly
    back = from_ours(ours.state_dict(), "torchvision")
    ref2 = getattr(torchvision.models, f"convnext_{size}")(num_classes=13).eval()
    ref2.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert _max_diff(ref2(x), ref(x)) == 0


def _hf_models():
    transformers = pytest.importorskip("transformers")
    cfg_v1 = transformers.ConvNextConfig(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=9)
    cfg_v2 = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], num_labels=9)
    return [("convnext_atto", transformers.ConvNextForImageClassification(cfg_v1)),
            ("convnextv2_atto", transformers.ConvNextV2ForImageClassification(cfg_v2))]


@pytest.mark.parametrize("idx", [0, 1], ids=["ConvNextForImageClassification", "ConvNextV2ForImageClassification"])
@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_huggingface_parity(idx, serialization, tmp_path):
    name, ref = _hf_models()[idx]
    perturb(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(tmp_path, safe_serialization=serialization == "safetensors")
    ours = convnext.create_model(name, pretrained=tmp_path).eval()  # the directory save_pretrained wrote
    assert ours.num_classes == 9
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # HF's final LayerNorm uses eps 1e-12 (official: 1e-6); match it to compare the weights alone.
        ours.head.norm.eps = ref.config.layer_norm_eps
        assert _max_diff(ours(x), ref(pixel_values=x).logits) <= TOL


def test_huggingface_eps_difference_is_tiny():
    """With the official eps 1e-6 the logits differ from HF's 1e-12 final LN by far less than 1e-4."""
    name, ref = _hf_models()[0]
    perturb(ref)
    ours = convnext.create_model(name, pretrained=ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(pixel_values=x).logits) <= TOL


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny"])
def test_official_round_trip_is_exact(name, tmp_path, timm):
    """ours -> official .pth ({'model': ...}) -> ours -> safetensors -> ours, bit for bit."""
    src = perturb(convnext.create_model(name, num_classes=5))
    official = from_ours(src.state_dict(), "official")
    assert "downsample_layers.0.0.weight" in official and "head.weight" in official
    if "v2" in name:
        assert official["stages.0.0.grn.gamma"].shape == (1, 1, 1, 4 * src.cfg.dims[0])
    torch.save({"model": official, "epoch": 3}, tmp_path / "official.pth")

    a = convnext.create_model(name, pretrained=tmp_path / "official.pth")
    convnext.save_checkpoint(a, tmp_path / "ours.safetensors")
    b = convnext.create_model(name, pretrained=tmp_path / "ours.safetensors")
    for m in (a, b):
        for (k, v), (k2, v2) in zip(src.state_dict().items(), m.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2), k
    again = from_ours(b.state_dict(), "official")
    assert official.keys() == again.keys() and all(torch.equal(official[k], again[k]) for k in official)

    # An independent reader of the official layout (timm's own remapping) gives the same logits.
    from timm.models.convnext import checkpoint_filter_fn

    ref = timm.create_model(name, num_classes=5).eval()
    ref.load_state_dict(checkpoint_filter_fn({"model": official}, ref))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ref(x), b.eval()(x)) <= TOL


def test_official_model_ema_wrapper(tmp_path):
    src = perturb(convnext.create_model("convnext_atto", num_classes=3))
    other = perturb(convnext.create_model("convnext_atto", num_classes=3), std=0.5)
    torch.save({"model": from_ours(src.state_dict(), "official"),
                "model_ema": from_ours(other.state_dict(), "official")}, tmp_path / "train.pth")
    m = convnext.create_model("convnext_atto", num_classes=3)
    assert convnext.load_checkpoint(m, tmp_path / "train.pth") == "official"
    assert torch.equal(m.stem.conv.weight, src.stem.conv.weight)
    convnext.load_checkpoint(m, tmp_path / "train.pth", key="model_ema")
    assert torch.equal(m.stem.conv.weight, other.stem.conv.weight)


def _reference_isotropic(sd, x, eps=1e-6):
    """The official convnext_isotropic.py forward, written out over an official state dict."""
    import torch.nn.functional as F

    x = F.conv2d(x, sd["stem.weight"], sd["stem.bias"], stride=16)
    j = 0
    while f"blocks.{j}.dwconv.weight" in sd:
        p = f"blocks.{j}."
        y = F.conv2d(x, sd[p + "dwconv.weight"], sd[p + "dwconv.bias"], padding=3, groups=x.shape[1])
        y = y.permute(0, 2, 3, 1)
        y = F.layer_norm(y, y.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, sd[p + "pwconv1.weight"], sd[p + "pwconv1.bias"])),
                     sd[p + "pwconv2.weight"], sd[p + "pwconv2.bias"])
        if p + "gamma" in sd:
            y = sd[p + "gamma"] * y
        x = x + y.permute(0, 3, 1, 2)
        j += 1
    x = F.layer_norm(x.mean([-2, -1]), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], eps)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name", ["convnext_isotropic_small"])  # (base and large: the same blocks, wider)
def test_official_isotropic_checkpoint(name, tmp_path):
    src = perturb(convnext.create_model(name, num_classes=6))
    official = from_ours(src.state_dict(), "official_isotropic")
    assert "stem.weight" in official and "norm.weight" in official and "head.weight" in official
    torch.save({"model": official}, tmp_path / "iso.pth")
    ours = convnext.create_model(name, pretrained=tmp_path / "iso.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), _reference_isotropic(official, x)) <= TOL


def test_isotropic_layer_scale_must_be_asked_for(tmp_path):
    """Official iso-L was trained with LayerScale, S/B without: a checkpoint that differs from the
    registered variant loads only when asked for explicitly (never a silent change of family)."""
    src = convnext.create_model("convnext_isotropic_small", num_classes=2, ls_init_value=0.5)
    torch.save({"model": from_ours(src.state_dict(), "official_isotropic")}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="has LayerScale.*pass ls_init_value=1e-6"):
        convnext.create_model("convnext_isotropic_small", pretrained=tmp_path / "w.pth")
    ours = convnext.create_model("convnext_isotropic_small", pretrained=tmp_path / "w.pth", ls_init_value=1e-6)
    assert ours.blocks[0].gamma is not None and torch.equal(ours.blocks[0].gamma, src.blocks[0].gamma)


def _to_fcmae(official: dict) -> dict:
    """Our official-layout weights written as an FCMAE (MinkowskiEngine) pre-training checkpoint."""
    out = {}
    for k, v in official.items():
        if k.startswith(("head.", "norm.")):
            continue  # FCMAE encoders have no classifier or final norm
        dense_stem = k.startswith("downsample_layers.0.")
        if k.endswith(".weight") and v.ndim == 4 and not dense_stem:
            base = k[: -len(".weight")]
            if v.shape[1] == 1:  # depthwise (C, 1, k, k) -> (k*k, C)
                c, _, ks, _ = v.shape
                out[f"encoder.{base}.kernel"] = v.transpose(3, 2).reshape(c, ks * ks).permute(1, 0).contiguous()
            else:  # (out, in, k, k) -> (k*k, in, out)
                co, ci, ks, _ = v.shape
                out[f"encoder.{base}.kernel"] = v.transpose(3, 2).reshape(co, ci, ks * ks).permute(2, 1, 0).contiguous()
        elif k.endswith(".bias") and v.ndim == 1 and not dense_stem and (".dwconv." in k or ".1.bias" in k):
            out[f"encoder.{k}"] = v.reshape(1, -1)  # Minkowski conv biases are (1, C)
        elif not dense_stem and (".norm." in k or k.split(".")[-2] == "0"):
            out[f"encoder.{k.rsplit('.', 1)[0]}.ln.{k.rsplit('.', 1)[1]}"] = v
        elif ".pwconv" in k:
            out[f"encoder.{k.rsplit('.', 1)[0]}.linear.{k.rsplit('.', 1)[1]}"] = v
        elif ".grn." in k:
            out[f"encoder.{k}"] = v.reshape(1, -1)
        else:
            out[f"encoder.{k}"] = v
    out["mask_token"] = torch.zeros(1, 512, 1, 1)
    out["proj.weight"], out["pred.weight"] = torch.zeros(512, 320, 1, 1), torch.zeros(3072, 512, 1, 1)
    out["decoder.0.dwconv.weight"] = torch.zeros(512, 1, 7, 7)
    return out


def test_fcmae_pretraining_checkpoint(tmp_path, caplog):
    src = perturb(convnext.create_model("convnextv2_atto"))
    fcmae = _to_fcmae(from_ours(src.state_dict(), "official"))
    assert any(k.endswith("dwconv.kernel") for k in fcmae) and detect_format(fcmae) == "fcmae"
    torch.save({"model": fcmae}, tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    m = convnext.create_model("convnextv2_atto", pretrained=tmp_path / "convnextv2_atto_1k_224_fcmae.pt",
                              num_classes=10)
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(m.state_dict()[k], v), k
    assert m.num_classes == 10


def test_every_public_layout_is_detected(tmp_path):
    ours = convnext.create_model("convnext_atto").state_dict()
    for fmt in ("official", "timm", "torchvision", "hf"):
        assert detect_format(from_ours(ours, fmt)) == fmt
    iso = convnext.create_model("convnext_isotropic_small", num_classes=2).state_dict()
    assert detect_format(from_ours(iso, "official_isotropic")) == "official_isotropic"
    assert detect_format(iso) == "ours"
    # DDP / torch.compile prefixes are stripped.
    torch.save({"state_dict": {"module._orig_mod." + k: v for k, v in ours.items()}}, tmp_path / "ddp.pth")
    obj, _ = read_checkpoint(tmp_path / "ddp.pth")
    m = convnext.create_model("convnext_atto")
    assert convnext.load_checkpoint(m, obj) == "ours"


# --- the official model definitions, transcribed (facebookresearch/ConvNeXt models/convnext.py and
# facebookresearch/ConvNeXt-V2 models/convnextv2.py, utils.py: LayerNorm, GRN), so that a state dict in the
# official layout comes from the official code itself, not from our converter ----------------------------

class _OfficialLayerNorm(torch.nn.Module):
    def __init__(self, normalized_shape, eps=1e-6, data_format="channels_last"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(normalized_shape))
        self.bias = torch.nn.Parameter(torch.zeros(normalized_shape))
        self.eps, self.data_format, self.normalized_shape = eps, data_format, (normalized_shape,)

    def forward(self, x):
        if self.data_format == "channels_last":
            return torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _OfficialGRN(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = torch.nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class _OfficialBlock(torch.nn.Module):
    def __init__(self, dim, v2, layer_scale_init_value=1e-6):
        super().__init__()
        self.dwconv = torch.nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = _OfficialLayerNorm(dim, eps=1e-6)
        self.pwconv1 = torch.nn.Linear(dim, 4 * dim)
        self.act = torch.nn.GELU()
        if v2:
            self.grn = _OfficialGRN(4 * dim)
        self.pwconv2 = torch.nn.Linear(4 * dim, dim)
        self.gamma = None if v2 else torch.nn.Parameter(layer_scale_init_value * torch.ones(dim))
        self.v2 = v2

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.act(self.pwconv1(self.norm(x)))
        if self.v2:
            x = self.grn(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + x.permute(0, 3, 1, 2)


class _OfficialConvNeXt(torch.nn.Module):
    def __init__(self, depths, dims, num_classes, v2):
        super().__init__()
        self.downsample_layers = torch.nn.ModuleList([torch.nn.Sequential(
            torch.nn.Conv2d(3, dims[0], kernel_size=4, stride=4), _OfficialLayerNorm(dims[0], data_format="channels_first"))])
        for i in range(3):
            self.downsample_layers.append(torch.nn.Sequential(_OfficialLayerNorm(dims[i], data_format="channels_first"),
                                                              torch.nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
        self.stages = torch.nn.ModuleList(torch.nn.Sequential(*[_OfficialBlock(dims[i], v2) for _ in range(depths[i])])
                                          for i in range(4))
        self.norm = torch.nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = torch.nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean([-2, -1])))


@pytest.mark.parametrize("name,depths,dims,classes,v2", [
    ("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768), 21841, False),  # an in22k head: 21,841 classes
    ("convnextv2_atto", (2, 2, 6, 2), (40, 80, 160, 320), 1000, True),
])
def test_a_state_dict_of_the_official_code_loads_and_computes_the_same(tmp_path, name, depths, dims, classes, v2):
    ref = perturb(_OfficialConvNeXt(depths, dims, classes, v2))
    torch.save({"model": ref.state_dict()}, tmp_path / "official.pth")  # as the official main.py saves it
    ours = convnext.create_model(name, pretrained=tmp_path / "official.pth").eval()
    assert ours.num_classes == classes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= TOL * max(1.0, ref(x).abs().max().item())
