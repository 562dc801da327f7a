import itertools
import math

import pytest
import torch

import convnext
from convnext.models import MODELS
from convnext.models.flops import count_macs, count_params

from helpers import perturb

# Golden parameter counts with 1000 classes (equal to timm's; convnext_tiny = torchvision's 28,589,128).
PARAMS = {
    "convnext_atto": 3_695_520, "convnext_femto": 5_217_784, "convnext_pico": 9_045_672,
    "convnext_nano": 15_593_560, "convnext_tiny": 28_589_128, "convnext_small": 50_223_688,
    "convnext_base": 88_591_464, "convnext_large": 197_767_336, "convnext_xlarge": 350_196_968,
    "convnextv2_atto": 3_708_400, "convnextv2_femto": 5_233_240, "convnextv2_pico": 9_066_280,
    "convnextv2_nano": 15_623_800, "convnextv2_tiny": 28_635_496, "convnextv2_small": 50_318_440,
    "convnextv2_base": 88_717_800, "convnextv2_large": 197_956_840, "convnextv2_huge": 660_289_640,
    "convnext_isotropic_small": 22_308_712, "convnext_isotropic_base": 87_083_752,
    "convnext_isotropic_large": 305_942_504,
}
# Papers' "FLOPs" (multiply-accumulates) at 224: ConvNeXt Table 10/README, ConvNeXt V2 Table 12/README.
PAPER_GMACS = {
    "convnext_tiny": 4.5, "convnext_small": 8.7, "convnext_base": 15.4, "convnext_large": 34.4,
    "convnext_xlarge": 60.9, "convnextv2_atto": 0.55, "convnextv2_femto": 0.78, "convnextv2_pico": 1.37,
    "convnextv2_nano": 2.45, "convnextv2_tiny": 4.47, "convnextv2_base": 15.4, "convnextv2_large": 34.4,
    "convnextv2_huge": 115, "convnext_isotropic_small": 4.3, "convnext_isotropic_base": 16.9,
    "convnext_isotropic_large": 59.7,
}
# Paper's 384 numbers, to check the FLOPs scale with resolution too.
PAPER_GMACS_384 = {"convnext_tiny": 13.1, "convnext_base": 45.0, "convnext_xlarge": 179.0, "convnextv2_huge": 337.9}
LARGE = {"convnext_xlarge", "convnextv2_huge", "convnext_isotropic_large", "convnextv2_large", "convnext_large"}


def test_registry_lists_every_required_name():
    required = [f"convnext_{s}" for s in ("atto", "femto", "pico", "nano", "tiny", "small", "base", "large", "xlarge")]
    required += [f"convnextv2_{s}" for s in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")]
    required += [f"convnext_isotropic_{s}" for s in ("small", "base", "large")]
    assert set(required) <= set(convnext.list_models())
    assert convnext.list_models("convnextv2_*") == sorted(n for n in MODELS if n.startswith("convnextv2_"))


@pytest.mark.parametrize("name", list(MODELS))
def test_param_count_and_macs(name):
    with torch.device("meta"):
        model = convnext.create_model(name)
        assert count_params(model) == PARAMS[name]
        if name in PAPER_GMACS:
            assert count_macs(model, 224) / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.01)
        if name in PAPER_GMACS_384:
            assert count_macs(model, 384) / 1e9 == pytest.approx(PAPER_GMACS_384[name], rel=0.01)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_every_variant(name):
    """Parameters and output shape of every variant; the large ones on the meta device (shapes only: the
    same blocks run numerically in the small ones)."""
    device = "meta" if name in LARGE else "cpu"
    with torch.device(device):
        model = convnext.create_model(name, num_classes=7).eval()
        x = torch.randn(2, 3, 64, 64)
    assert count_params(model) == PARAMS[name] - (1000 - 7) * (model.num_features + 1)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7)
    assert device == "meta" or torch.isfinite(y).all()


def test_init_matches_the_paper():
    model = convnext.create_model("convnext_tiny", head_init_scale=0.001)
    blk = model.stages[2].blocks[0]
    assert torch.equal(blk.gamma, torch.full((384,), 1e-6))
    assert blk.pwconv1.bias.abs().max() == 0 and blk.dwconv.bias.abs().max() == 0
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.head.fc])
    assert w.std().item() == pytest.approx(0.02, rel=0.02) and w.abs().max() < 2.0
    assert model.head.fc.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.05)
    assert torch.equal(model.stem.norm.weight, torch.ones(96)) and model.stem.norm.eps == 1e-6
    v2 = convnext.create_model("convnextv2_atto")
    assert v2.stages[0].blocks[0].gamma is None
    assert torch.equal(v2.stages[0].blocks[0].grn.gamma, torch.zeros(160))


def test_drop_path_linear_in_depth_and_only_in_training():
    model = convnext.create_model("convnext_atto", drop_path_rate=0.3)
    rates = [b.drop_path.p for s in model.stages for b in s.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)
    assert all(b > a for a, b in itertools.pairwise(rates))
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("hw", [(32, 32), (33, 47), (100, 64), (224, 160)])
def test_any_input_size_at_least_32(hw):
    model = convnext.create_model("convnextv2_atto", num_classes=3, features_only=True).eval()
    feats = model(torch.randn(1, 3, *hw))
    h, w = hw
    for f, s in zip(feats, (4, 8, 16, 32), strict=True):
        # Each patchify/downsample conv floors, like the official code.
        assert f.shape[-2:] == (h // s, w // s)


def test_channels_last_input_gives_same_logits():
    model = convnext.create_model("convnext_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = model(x)
        b = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = convnext.create_model("convnextv2_atto", num_classes=5)
        model.set_grad_checkpointing(ckpt)
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_bf16_autocast_norm_statistics_in_fp32(name):
    import copy

    # Perturbed weights: GRN's gamma/beta and LayerScale far from their (identity-like) init, so they matter.
    model = perturb(convnext.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64) * 50  # large activations: bf16/fp16 statistics would lose them
    wrong = copy.deepcopy(model)  # what a broken GRN (V2) or LayerScale (V1) would compute
    for m in wrong.modules():
        if isinstance(m, convnext.models.GRN):
            m.gamma.data.zero_()
        elif isinstance(m, convnext.models.Block) and m.gamma is not None:
            m.gamma.data.mul_(0.5)
    with torch.no_grad():
        ref, off = model(x), wrong(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
    tol = 0.03 * ref.abs().max()  # bf16 rounding measured ~1% of the logits' range; a broken GRN/LS ~10%
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < tol
    assert (off - ref).abs().max() > tol  # the tolerance would catch a wrong GRN / LayerScale
    # The norm layers themselves must not run in bf16 statistics: ours stay within bf16 rounding of the fp32
    # statistics, where a variant computing them in bf16 (what the tolerance must catch) is far off.
    from convnext.models import GRN, LayerNorm

    bf = torch.bfloat16
    ln = LayerNorm(64)
    t = (1000 + torch.randn(2, 8, 8, 64)).to(bf)  # a large mean: the statistics cancel

    def ln_bf16_statistics(x):
        mu = x.mean(-1, keepdim=True)  # rounded to bf16 (its step at 1000 is 4; the spread is ~2)
        d = x - mu
        return d / ((d * d).mean(-1, keepdim=True) + 1e-6).sqrt()

    with torch.no_grad():
        want = ln(t.float())
        assert ln(t).dtype == bf
        ours, broken = (ln(t).float() - want).abs().max(), (ln_bf16_statistics(t).float() - want).abs().max()
    assert ours < 0.05 < 0.2 < broken, (ours, broken)

    grn = GRN(4)
    with torch.no_grad():
        grn.gamma.fill_(1.0)
    u = torch.tensor([1.0, 0.1, 0.3, 2.0]).expand(1, 32, 32, 4).contiguous().to(bf)  # 1024 positions

    def grn_bf16_statistics(x):
        acc = torch.zeros(x.shape[0], 1, 1, x.shape[-1], dtype=bf)
        for v in (x * x).reshape(x.shape[0], -1, 1, x.shape[-1]).unbind(1):  # a bf16 running sum, as a
            acc = (acc + v[:, None]).to(bf)                                  # bf16 reduction would keep it
        gx = acc.sqrt()
        return x * (gx / (gx.mean(-1, keepdim=True) + 1e-6)) + x

    with torch.no_grad():
        want = grn(u.float())
        ours, broken = ((grn(u).float() - want).abs() / want.abs()).max(), \
            ((grn_bf16_statistics(u).float() - want).abs() / want.abs()).max()
    assert ours < 0.01 < 0.03 < broken, (ours, broken)  # (deterministic inputs: 0.0023 vs 0.036)


def test_fp16_grn_does_not_overflow():
    from convnext.models import GRN

    grn = GRN(8)
    x = torch.full((1, 128, 128, 8), 1000.0, dtype=torch.float16)  # spatial L2 norm > fp16 max
    assert not torch.isfinite(torch.linalg.vector_norm(x, dim=(1, 2))).all()
    assert torch.isfinite(grn(x)).all()


def test_forward_head_pre_logits_and_reset_classifier():
    model = convnext.create_model("convnext_atto").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.forward_features(x)
        assert f.shape == (2, 320, 2, 2)
        assert model.forward_head(f, pre_logits=True).shape == (2, 320)
        torch.testing.assert_close(model.forward_head(f), model(x))
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert model(x).shape == (2, 320)


def test_features_only_feature_info_and_out_indices():
    model = convnext.create_model("convnext_tiny", features_only=True, out_indices=(1, 3))
    assert model.feature_info.channels() == [192, 768]
    assert model.feature_info.reduction() == [8, 32]
    assert not hasattr(model, "head")
    feats = model(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [192, 768]
    short = convnext.create_model("convnext_tiny", features_only=True, out_indices=(0, 1))
    assert len(short.stages) == 2  # stages after the last output are not built


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="did you mean convnext_tiny"):
        convnext.create_model("convnext_tinyy")
    with pytest.raises(ValueError, match="unknown option"):
        convnext.create_model("convnext_tiny", layer_scale=1.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        convnext.create_model("convnext_tiny", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="out_indices"):
        convnext.create_model("convnext_tiny", features_only=True, out_indices=(4,))
    with pytest.raises(ValueError, match="features_only"):
        convnext.create_model("convnext_isotropic_small", features_only=True)


def test_in_chans_and_isotropic_shapes():
    model = convnext.create_model("convnext_isotropic_small", num_classes=4, in_chans=1).eval()
    assert model.stem.weight.shape == (384, 1, 16, 16)
    assert len(model.blocks) == 18 and model.blocks[0].gamma is None
    assert convnext.create_model("convnext_isotropic_large", num_classes=0).blocks[0].gamma is not None
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 48)).shape == (2, 4)
    assert math.isclose(model.feature_info.reduction()[0], 16)


# --- The fast path: same function as the textbook block, in inference and in training -----------

def test_block_reads_like_the_paper():
    """print(model) shows the paper's op sequence, GELU included, and the textbook forward is the default's."""
    block = convnext.create_model("convnextv2_atto").stages[0].blocks[0]
    assert [n for n, _ in block.named_children()] == ["dwconv", "norm", "pwconv1", "act", "grn", "pwconv2", "drop_path"]
    assert "(act): GELU(approximate='none')" in str(block)
    assert block.dwconv.kernel_size == (7, 7) and block.dwconv.groups == 40 and block.pwconv1.out_features == 160


def _reference(model):
    """The textbook model: the same weights, every block computed by the paper's op sequence (`Block.forward`)."""
    import copy

    ref = copy.deepcopy(model)
    ref.set_fast_path(False)
    return ref


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_isotropic_small"])
def test_fast_path_logits_and_fused_model_match_the_reference(name):
    import copy

    model = perturb(convnext.create_model(name))
    ref = _reference(model)
    for size in (64, 96):  # 96: last stage 3x3, where the depthwise kernel is cropped
        x = torch.randn(3, 3, size, size)
        with torch.no_grad():
            want = ref(x)
            fast = model(x)  # eager CPU inference: oneDNN fused Linear+GELU / Linear+residual
            fused = copy.deepcopy(model).fuse_for_inference()(x)
            nchw_grad = model(x.contiguous(memory_format=torch.channels_last))
        with torch.enable_grad():
            train_path = model(x)  # the autograd path (folded LayerScale, Toeplitz dwconv on small maps)
        for got in (fast, fused, nchw_grad, train_path):
            assert (got - want).abs().max().item() <= 1e-4


def test_fast_path_training_loss_curve_matches_the_reference_for_20_steps():
    import torch.nn.functional as F

    for name in ("convnext_atto", "convnextv2_atto"):
        model = perturb(convnext.create_model(name, num_classes=10)).train()
        ref = _reference(model).train()
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        curves = []
        for m in (model, ref):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            losses = []
            for _ in range(20):
                loss = F.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            curves.append(losses)
        assert curves[0][-1] < curves[0][0] - 0.5  # it learns
        assert max(abs(a - b) for a, b in zip(*curves, strict=True)) <= 1e-4, curves


def test_fuse_for_inference_is_one_way():
    model = convnext.create_model("convnext_atto").fuse_for_inference()
    assert not model.training
    assert all(b.gamma is None and b.norm.weight is None for b in model.stages[0].blocks)
    with pytest.raises(RuntimeError, match="fused for inference"):
        model.train()
    v2 = convnext.create_model("convnextv2_atto").fuse_for_inference()
    assert v2.stages[0].blocks[0].grn.beta is None


# --- optimize_for_inference: the fastest path, the same outputs ------------------------------------

@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_conv_mlp_graph_form_is_the_same_function(name):
    """The graph form compile uses for fp32 (MLP as 1x1 convs) computes the textbook block."""
    from convnext.models import fast

    model = perturb(convnext.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        fast.use_graph_form(model, "conv_mlp")
        traced = torch.jit.trace(model, x)  # capturing a graph: the conv-MLP form
    assert str(traced.inlined_graph).count("aten::linear") == 1  # only the classifier; the MLPs are convs
    assert (traced(x) - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_optimize_for_inference_gives_the_same_outputs(name):
    model = perturb(convnext.create_model(name, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    fp32 = convnext.optimize_for_inference(model)
    assert fp32.how == "eager fast path (fp32)" and (fp32(x) - want).abs().max().item() <= 1e-4
    bf16 = convnext.optimize_for_inference(model, precision="bf16")
    got = bf16(x)
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.03 * want.abs().max()  # bf16 rounding
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    with pytest.raises(RuntimeError, match="cannot be trained"):
        fp32.train()
    with pytest.raises(ValueError, match="precision"):
        convnext.optimize_for_inference(model, precision="int8")


@pytest.mark.slow
def test_optimize_for_inference_times_eager_and_compiled_and_keeps_the_faster():
    model = perturb(convnext.create_model("convnext_atto", num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    # "auto" with a small job: compiling would not pay back, the eager path is kept without compiling
    small = convnext.optimize_for_inference(model, example_input=x, expected_calls=3)
    assert small.how.startswith("eager") and small.compile_s is None
    best = convnext.optimize_for_inference(model, example_input=x, compile=True)
    assert set(best.timings_ms) == {"eager", "compiled"} and best.compile_s > 0
    faster = min(best.timings_ms, key=best.timings_ms.get)
    assert best.how.startswith("torch.compile" if faster == "compiled" else "eager")
    assert (best(x) - want).abs().max().item() <= 1e-4
    assert (best(torch.randn(2, 3, 96, 96)).shape == (2, 10))  # other shapes still run


@pytest.mark.slow
def test_bf16_depthwise_backward_is_as_accurate_as_aten():
    """bf16 CPU training computes the depthwise weight gradient in one fused fp32-accumulated pass and the
    input gradient as a flipped-kernel conv: against fp32, no less accurate than aten's bf16 backward."""
    from convnext.models import fast

    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 12, 12)

    def grads(fn, dtype):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = fn(xi)
        y.float().backward(g)
        return [xi.grad.float(), conv.weight.grad.clone(), conv.bias.grad.clone()]

    want = grads(conv, torch.float32)
    aten = grads(conv, torch.bfloat16)  # nn.Conv2d under autocast: aten's bf16 kernels
    ours = grads(lambda t: fast.depthwise_conv(conv, t, fused_backward=True), torch.bfloat16)
    assert fast._compiled_weight_grad  # the fused weight-gradient path was taken
    for a, o, w in zip(aten, ours, want, strict=True):
        err_o, err_a = (((t - w).norm() / w.norm()).item() for t in (o, a))
        assert err_o <= 1.5 * err_a + 1e-3, (err_o, err_a)
