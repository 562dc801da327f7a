"""FCMAE pre-training: the dense emulation of the sparse encoder, the loss, masks, the official key layout,
and the `convnext pretrain` task on the engine (CLI, fine-tuning, kill-and-resume, DDP, bf16)."""

import json
import math
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from helpers import assert_same_run, perturb, run_cli, sigkill_when

from convnext import create_model
from convnext.data.fashion_mnist import prepare
from convnext.fcmae import create_fcmae, patchify, random_mask, visible_at
from convnext.weights import read_checkpoint
from convnext.weights.convert import fcmae_from_official, fcmae_to_official


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "convnext", *map(str, args)], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw)


def _noise_in_masked(x, mask, p, scale=100.0):
    hidden = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]
    return x * (1 - hidden) + hidden * torch.randn_like(x) * scale


# --- the method -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size,p", [("convnextv2_atto", 64, 32), ("convnextv2_atto", 64, 16),
                                         ("convnextv2_atto", 64, 8), ("convnextv2_tiny", 96, 32)])
def test_masked_pixels_change_no_visible_output_bitwise(name, size, p):
    """Replacing the masked pixels by noise changes nothing the encoder or decoder computes (fp32, bitwise):
    nothing masked leaks, also through coarser stages where a position is visible if any child is."""
    model = perturb(create_fcmae(name, mask_patch_size=p, decoder_dim=64), std=0.1)  # GRN, LN biases: non-zero
    x = torch.randn(2, 3, size, size)
    mask = model.random_mask(x)
    x2 = _noise_in_masked(x, mask, p)
    assert not torch.equal(x, x2)
    with torch.no_grad():
        f1, f2 = model.forward_encoder(x, mask), model.forward_encoder(x2, mask)
        assert torch.equal(f1, f2)
        assert torch.equal(model.forward_decoder(f1, mask), model.forward_decoder(f2, mask))
        assert f1.abs().sum() > 0


@pytest.mark.parametrize("p", [32, 16])
def test_encoder_computes_what_the_sparse_encoder_computes(p):
    """Sparse semantics: masked positions do not exist. Appending a fully masked strip of patches to the image
    must change nothing at the original positions — it would if GRN pooled over masked positions or the
    downsampling conv read the LayerNorm bias written into them."""
    model = perturb(create_fcmae("convnextv2_atto", mask_patch_size=p, decoder_dim=64), std=0.1)
    x = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(x)
    wide = torch.cat([x, torch.randn(2, 3, 64, 32)], dim=3)
    wide_mask = torch.cat([mask, torch.ones(2, mask.shape[1], 32 // p)], dim=2)
    with torch.no_grad():
        assert torch.equal(model.forward_encoder(x, mask), model.forward_encoder(wide, wide_mask)[..., :2])
        # with nothing masked, the encoder is the plain model
        plain = model.encoder(x)[0]
        torch.testing.assert_close(model.forward_encoder(x, torch.zeros_like(mask)), plain, atol=1e-4, rtol=1e-4)


def _official_forward_loss(imgs, pred, mask, p, norm_pix_loss=False):
    """The official FCMAE.forward_loss + patchify (ConvNeXt-V2 models/fcmae.py), for square images."""
    n, c, _, _ = pred.shape
    pred = torch.einsum("ncl->nlc", pred.reshape(n, c, -1))
    h = w = imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(imgs.shape[0], 3, h, p, w, p)).reshape(imgs.shape[0], h * w, -1)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.flatten(1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_equals_the_official_loss_at_32px_patches(norm_pix_loss):
    model = perturb(create_fcmae("convnextv2_atto", decoder_dim=64, norm_pix_loss=norm_pix_loss))
    x = torch.randn(3, 3, 96, 96)
    loss, pred, mask = model(x)
    assert pred.shape == (3, 32 * 32 * 3, 3, 3) and mask.shape == (3, 3, 3)
    torch.testing.assert_close(loss, _official_forward_loss(x, pred, mask, 32, norm_pix_loss), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("p", [32, 16, 8])
def test_loss_only_on_masked_patches(p):
    """The gradient of every prediction pixel in a visible patch is exactly zero; masked patches get one."""
    model = perturb(create_fcmae("convnextv2_atto", mask_patch_size=p, decoder_dim=64))
    x = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(x)
    pred = model.forward_decoder(model.forward_encoder(x, mask), mask)
    pred.retain_grad()
    model.forward_loss(x, pred, mask).backward()
    per_patch = patchify(model.unpatchify(pred.grad), p).abs().sum(-1).reshape(mask.shape)
    assert torch.all(per_patch[mask == 0] == 0)
    assert torch.all(per_patch[mask == 1] > 0)


def test_mask_ratio_grid_and_statistics():
    g = torch.Generator().manual_seed(0)
    m = random_mask(4000, (7, 7), 0.6, generator=g)
    assert m.shape == (4000, 7, 7) and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.all((1 - m).flatten(1).sum(1) == int(49 * 0.4))  # exactly as the official len_keep
    freq = m.mean(0)  # every patch is masked equally often
    assert torch.allclose(freq, torch.full_like(freq, m.mean()), atol=0.04)
    assert len({tuple(r.flatten().tolist()) for r in m[:200]}) > 190  # a fresh mask per image
    model = create_fcmae("convnextv2_atto", mask_patch_size=16, decoder_dim=64)
    assert model.random_mask(torch.zeros(2, 3, 64, 96)).shape == (2, 4, 6)
    # finer stages repeat the mask; a coarser position is visible when any of its children is
    mask = torch.tensor([[[1, 1, 0, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]]).float()
    assert visible_at(mask, (8, 8)).shape == (1, 1, 8, 8) and visible_at(mask, (8, 8)).sum() == 4
    assert visible_at(mask, (2, 2))[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="mask_patch_size must be a multiple of the stem stride"):
        create_fcmae("convnextv2_atto", mask_patch_size=12)
    with pytest.raises(ValueError, match="isotropic"):
        create_fcmae("convnext_isotropic_small")
    model = create_fcmae("convnextv2_atto", decoder_dim=64)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="mask must be"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(1, 4, 4))


@torch.no_grad()
def test_official_init_is_the_official_code_s():
    model = create_fcmae("convnextv2_atto", init="official")
    enc = model.encoder
    assert float(enc.stages[0].blocks[0].pwconv1.weight.std()) == pytest.approx(0.88, abs=0.03)  # trunc_normal_(std 1, +-2)
    assert float(enc.stem.conv.weight.std()) == pytest.approx(0.88, abs=0.1)
    assert float(enc.stages[1].downsample.conv.weight.std()) == pytest.approx(0.02, abs=0.003)
    fc1 = model.decoder[0].pwconv1.weight  # torch's default Linear init: U(+-1/sqrt(fan_in))
    assert fc1.abs().max() <= 1 / math.sqrt(512) and float(fc1.std()) == pytest.approx(1 / math.sqrt(3 * 512), rel=0.05)
    assert float(model.mask_token.std()) == pytest.approx(0.02, abs=0.005)
    default = create_fcmae("convnextv2_atto")
    assert float(default.encoder.stages[0].blocks[0].pwconv1.weight.std()) == pytest.approx(0.02, abs=0.003)


# --- the official key layout --------------------------------------------------------------------------
def _official_remap_checkpoint_keys(ckpt):
    """The official ConvNeXt-V2 `utils.remap_checkpoint_keys` (what official fine-tuning runs on an FCMAE file)."""
    new_ckpt = OrderedDict()
    for k, v in ckpt.items():
        if k.startswith('encoder'):
            k = '.'.join(k.split('.')[1:])
        if k.endswith('kernel'):
            k = '.'.join(k.split('.')[:-1])
            new_k = k + '.weight'
            if len(v.shape) == 3:
                kv, in_dim, out_dim = v.shape
                ks = int(math.sqrt(kv))
                new_ckpt[new_k] = v.permute(2, 1, 0).reshape(out_dim, in_dim, ks, ks).transpose(3, 2)
            elif len(v.shape) == 2:
                kv, dim = v.shape
                ks = int(math.sqrt(kv))
                new_ckpt[new_k] = v.permute(1, 0).reshape(dim, 1, ks, ks).transpose(3, 2)
            continue
        elif 'ln' in k or 'linear' in k:
            k = k.split('.')
            k.pop(-2)
            new_k = '.'.join(k)
        else:
            new_k = k
        new_ckpt[new_k] = v
    for k, v in new_ckpt.items():
        if k.endswith('bias') and len(v.shape) != 1:
            new_ckpt[k] = v.reshape(-1)
        elif 'grn' in k:
            new_ckpt[k] = v.unsqueeze(0).unsqueeze(1)
    return new_ckpt


def test_official_fcmae_layout_round_trips_bit_exactly(tmp_path):
    model = perturb(create_fcmae("convnextv2_atto"))
    official = fcmae_to_official(model.state_dict())
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    assert shapes["encoder.downsample_layers.0.0.weight"] == (40, 3, 4, 4)  # the stem stays dense
    assert shapes["encoder.downsample_layers.1.0.ln.weight"] == (40,)
    assert shapes["encoder.downsample_layers.1.1.kernel"] == (4, 40, 80)  # Minkowski (k*k, in, out)
    assert shapes["encoder.downsample_layers.1.1.bias"] == (1, 80)
    assert shapes["encoder.stages.0.1.dwconv.kernel"] == (49, 40) and shapes["encoder.stages.0.1.dwconv.bias"] == (1, 40)
    assert shapes["encoder.stages.0.1.norm.ln.bias"] == (40,)
    assert shapes["encoder.stages.3.1.pwconv1.linear.weight"] == (1280, 320)
    assert shapes["encoder.stages.3.1.grn.gamma"] == (1, 1280)
    assert shapes["proj.weight"] == (512, 320, 1, 1) and shapes["mask_token"] == (1, 512, 1, 1)
    assert shapes["decoder.0.grn.beta"] == (1, 1, 1, 2048) and shapes["decoder.0.dwconv.weight"] == (512, 1, 7, 7)
    assert shapes["pred.weight"] == (3072, 512, 1, 1)
    assert not any(k.startswith(("norm.", "head.", "encoder.norm", "encoder.head")) for k in official)
    # back to ours, bit-exact, encoder and decoder
    back = fcmae_from_official(official)
    ours = model.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # the official fine-tuning path (remap_checkpoint_keys) gives our encoder's dense weights
    remapped = {k: v for k, v in _official_remap_checkpoint_keys(official).items()  # the official fine-tuning
                if not k.startswith(("proj", "pred", "mask_token", "decoder"))}    # load ignores the decoder
    dense = create_model("convnextv2_atto", pretrained={"model": remapped},
                         num_classes=0, features_only=True, out_indices=(3,)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dense(x)[0], model.encoder(x)[0])
    # an official FCMAE file (the {"model": ...} .pt of main_pretrain.py) continues pre-training, all of it
    torch.save({"model": official, "epoch": 799}, tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    again = create_fcmae("convnextv2_atto", pretrained=tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    mask = model.random_mask(x)
    assert all(torch.equal(again.state_dict()[k], ours[k]) for k in ours)
    with torch.no_grad():
        assert torch.equal(again(x, mask)[0], model(x, mask)[0])


def test_a_decoder_that_does_not_fit_is_a_clear_error(tmp_path):
    torch.save({"model": fcmae_to_official(create_fcmae("convnextv2_atto").state_dict())}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="does not fit this FCMAE model.*decoder 256x1"):
        create_fcmae("convnextv2_atto", decoder_dim=256, pretrained=tmp_path / "f.pt")


# --- training ----------------------------------------------------------------------------------------------
def test_bf16_training_steps_stay_finite():
    model = create_fcmae("convnextv2_atto", mask_patch_size=16, decoder_dim=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    x = torch.randn(4, 3, 64, 64) * 3
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, _ = model(x)
        assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("fm") / "slice", per_class={"train": 12, "val": 4})


def _pretrain_args(data, out, *extra):
    return ["pretrain", "--model", "convnextv2_atto", "--data", data, "--output", out, "--input-size", 32,
            "--mask-patch-size", 8, "--decoder-dim", 64, "--epochs", 2, "--batch-size", 16, "--lr", 1e-3,
            "--warmup-epochs", 1, "--workers", 0, "--threads", 1, "--no-progress", "--probe-images", 4, *extra]


@pytest.mark.slow
def test_pretrain_then_finetune_through_the_cli(images, tmp_path, capsys):
    out = tmp_path / "pt"
    r = run_cli(capsys, *_pretrain_args(images / "train", out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "120 unlabelled images at 32 px" in r.stderr  # labelled sub-folders are read as plain images
    for f in ("metrics.jsonl", "last.pt", "curves.png", "reconstructions.png", "best.safetensors", "config.yaml"):
        assert (out / f).is_file(), f
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all({"train_loss", "lr", "probe_loss"} <= set(x) for x in lines)
    # export to the official layout; both files fine-tune through `train --finetune` with the V2 defaults
    c = run_cli(capsys, "convert", out / "last.pt", tmp_path / "fcmae.pt", "--to", "fcmae")
    assert c.returncode == 0, c.stderr
    assert "encoder.stages.0.0.dwconv.kernel" in torch.load(tmp_path / "fcmae.pt", weights_only=True)["model"]
    again = run_cli(capsys, "convert", out / "last.pt", tmp_path / "fcmae.pt", "--to", "fcmae")
    assert again.returncode == 2 and "pass --force" in again.stderr
    encoder = read_checkpoint(out / "last.pt")[0]["model"]
    for src in (out / "last.pt", tmp_path / "fcmae.pt"):
        ft = tmp_path / f"ft-{src.stem}"
        t = run_cli(capsys, "train", "--model", "convnextv2_atto", "--data", images, "--output", ft, "--finetune",
                    src, "--epochs", 1, "--batch-size", 24, "--input-size", 32, "--warmup-epochs", 0, "--workers", 0,
                    "--threads", 1, "--no-progress", "--aa", "none", "--mixup", 0, "--cutmix", 0, "--reprob", 0,
                    "--lr", 1e-9)
        assert t.returncode == 0, t.stderr[-3000:]
        assert "V2 fine-tuning defaults --head-init-scale 0.001, --layer-decay 0.9, --layer-decay-type single" in t.stderr
        state = read_checkpoint(ft / "last.pt")[0]
        assert state["config"]["head_init_scale"] == 0.001 and state["config"]["layer_decay_type"] == "single"
        w = state["model"]["stages.2.blocks.1.pwconv1.weight"]  # the pre-trained encoder, moved by lr 1e-9 only
        torch.testing.assert_close(w, encoder["encoder.stages.2.blocks.1.pwconv1.weight"], atol=1e-6, rtol=0)
        assert state["model"]["head.fc.weight"].abs().max() < 0.01  # head_init_scale 0.001
    # `pretrain eval`: the masked-patch loss of a folder under fixed masks (the probe loss's definition: the
    # probe images of training, their masks drawn from the run's seed + 1)
    probe = tmp_path / "probe"
    for i, p in enumerate(sorted((images / "train").rglob("*.png"))[::30][:4]):
        (probe / str(i)).mkdir(parents=True)
        (probe / str(i) / p.name).write_bytes(p.read_bytes())
    ev = run_cli(capsys, "pretrain", "eval", "--checkpoint", out / "best.safetensors", "--data", probe,
                 "--input-size", 32, "--seed", 1, "--json")
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads(ev.stdout)
    assert res["count"] == 4 and res["mask_ratio"] == 0.6 and 0 < res["loss"] < 10
    again = json.loads(run_cli(capsys, "pretrain", "eval", "--checkpoint", out / "best.safetensors", "--data", probe,
                               "--input-size", 32, "--seed", 1, "--json").stdout)
    other = json.loads(run_cli(capsys, "pretrain", "eval", "--checkpoint", out / "best.safetensors", "--data", probe,
                               "--input-size", 32, "--seed", 2, "--json").stdout)
    assert again == res and other["loss"] != res["loss"]  # the masks come from the seed, nothing else
    pr = run_cli(capsys, "pretrain", "predict", *sorted(probe.rglob("*.png"))[:2], "--checkpoint", out / "last.pt",
                 "--output", tmp_path / "rec", "--input-size", 32)
    assert pr.returncode == 0, pr.stderr[-2000:]
    assert len(list((tmp_path / "rec").rglob("*.png"))) == 2 and pr.stdout.count("reconstruction loss") == 2
    wrong = run_cli(capsys, "detect", "eval", "--checkpoint", out / "best.safetensors", "--data", probe)
    assert wrong.returncode == 2 and "holds a pretrain model" in wrong.stderr and "convnext pretrain" in wrong.stderr
    bad = run_cli(capsys, "pretrain", "--model", "convnextv2_atto", "--data", images, "--output", tmp_path / "x",
                  "--layer-decay", "0.9")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--layer-decay is for fine-tuning" in bad.stderr


@pytest.mark.slow
def test_pretrain_sigkill_then_resume_is_bitwise(images, tmp_path):
    def cmd(out, *extra):
        return [sys.executable, "-m", "convnext", *map(str, _pretrain_args(images / "train", out, "--save-every-steps",
                                                                               1, *extra))]

    assert subprocess.run(cmd(tmp_path / "ref"), capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "killed"
    sigkill_when(cmd(out), out / "checkpoints" / "step-00000010.pt")  # mid epoch 2 (7 steps per epoch)
    r = subprocess.run(cmd(out, "--resume", "auto"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    a, b = read_checkpoint(tmp_path / "ref" / "last.pt")[0], read_checkpoint(out / "last.pt")[0]
    assert a["step"] == 14
    assert_same_run(a, b)


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_at_the_same_global_batch(images, tmp_path, capsys):
    one = run_cli(capsys, *_pretrain_args(images / "train", tmp_path / "one", "--batch-size", 16))
    assert one.returncode == 0, one.stderr[-3000:]
    two = cli(*_pretrain_args(images / "train", tmp_path / "two", "--batch-size", 8, "--nproc", 2))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 16 (8 x 1 x 2 processes)" in two.stderr
    a, b = read_checkpoint(tmp_path / "one" / "last.pt")[0], read_checkpoint(tmp_path / "two" / "last.pt")[0]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
        assert ha["probe_loss"] == pytest.approx(hb["probe_loss"], abs=1e-5)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)
