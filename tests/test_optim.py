"""Schedule values, parameter groups and layer-wise lr decay against the official formulas."""

import itertools
import math

import numpy as np
import pytest

import convnext
from convnext.train.optim import layer_id, param_groups
from convnext.train.schedule import lr_at
from convnext.weights import from_ours


def official_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs):
    """The official utils.cosine_scheduler (start_warmup_value 0), transcribed."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, schedule))


def test_schedule_matches_official_cosine_scheduler():
    ref = official_cosine_scheduler(4e-3, 1e-6, 30, 100, 5)
    ours = [lr_at(s, base_lr=4e-3, min_lr=1e-6, warmup_steps=500, total_steps=3000) for s in range(3000)]
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[0] == 0 and ours[499] == pytest.approx(4e-3)  # warmup end
    assert ours[500 + 1250] == pytest.approx((4e-3 + 1e-6) / 2, rel=1e-3)  # middle of the cosine
    assert ours[-1] == pytest.approx(1e-6, abs=1e-8)  # end
    assert lr_at(0, base_lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=10) == 1.0


def official_group_id(var_name):
    """Official ConvNeXt optim_factory.get_num_layer_for_convnext, transcribed."""
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage_id]
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return {0: 1, 1: 2, 2: 3 + block_id // 3, 3: 12}[stage_id]
    return 13


def official_single_id(var_name, depths):
    """Official ConvNeXt-V2 get_num_layer_for_convnext_single, transcribed."""
    if var_name.startswith("downsample_layers"):
        return sum(depths[: int(var_name.split(".")[1])]) + 1
    if var_name.startswith("stages"):
        s, b = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return sum(depths[:s]) + b + 1
    return sum(depths) + 1


@pytest.mark.parametrize("name,kind", [("convnext_base", "group"), ("convnextv2_base", "single"),
                                       ("convnextv2_atto", "single")])
def test_layer_ids_equal_the_official_assignment(name, kind):
    import torch

    with torch.device("meta"):
        model = convnext.create_model(name)
    ours = {k: layer_id(k, model.cfg.depths, kind) for k, _ in model.named_parameters()}
    # our parameter names -> official ones, through the same key table the converter uses
    official_names = list(from_ours({k: torch.empty(0) for k in ours}, "official"))
    for (k, (lid, n)), off in zip(ours.items(), official_names, strict=True):
        expected = official_group_id(off) if kind == "group" else official_single_id(off, model.cfg.depths)
        assert lid == expected, (k, off)
        assert n == (12 if kind == "group" else sum(model.cfg.depths))


def test_param_groups_decay_and_scales():
    model = convnext.create_model("convnextv2_atto", num_classes=5)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.8, layer_decay_type="single")
    names = {n: g for g in groups for n in g["names"]}
    assert names["stages.0.blocks.0.grn.gamma"]["weight_decay"] == 0  # GRN: no weight decay (V2 fix)
    assert names["stages.0.blocks.0.dwconv.bias"]["weight_decay"] == 0
    assert names["stages.0.blocks.0.norm.weight"]["weight_decay"] == 0
    assert names["stages.0.blocks.0.pwconv1.weight"]["weight_decay"] == 0.05
    assert names["head.fc.weight"]["lr_scale"] == 1.0
    n = sum(model.cfg.depths)
    assert names["stem.conv.weight"]["lr_scale"] == pytest.approx(0.8 ** n)
    assert names["stages.1.blocks.0.pwconv1.weight"]["lr_scale"] == pytest.approx(0.8 ** (n + 1 - 3))
    v1 = convnext.create_model("convnext_atto", num_classes=5)
    g1 = {n: g for g in param_groups(v1, 0.05) for n in g["names"]}
    assert g1["stages.0.blocks.0.gamma"]["weight_decay"] == 0  # LayerScale
    assert all(g["lr_scale"] == 1.0 for g in g1.values())
    # every size gets a monotone decay from the head down to the stem: in definition order (stem, stages,
    # head) the scale never falls, and each layer id has its own scale, ld ** (n + 1 - id)
    for name, kind in (("convnext_tiny", "group"), ("convnext_atto", "group"), ("convnextv2_atto", "single"),
                       ("convnext_isotropic_small", "group")):
        import torch

        with torch.device("meta"):
            m = convnext.create_model(name)
        scale = {n: g["lr_scale"] for g in param_groups(m, 0.05, 0.7, kind) for n in g["names"]}
        names = [n for n, _ in m.named_parameters()]
        order = [scale[n] for n in names]
        assert all(a <= b for a, b in itertools.pairwise(order)), name
        depths = m.cfg.depths if hasattr(m.cfg, "depths") else (m.cfg.depth,)
        for n in names:
            lid, num = layer_id(n, depths, kind)
            assert math.isclose(scale[n], 0.7 ** (num + 1 - lid)), (name, n)
        assert math.isclose(order[-1], 1.0) and len(set(order)) == len({layer_id(n, depths, kind) for n in names})
