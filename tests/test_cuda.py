"""CUDA paths: GPU vs CPU parity, fp16 + GradScaler and bf16 training steps, a compiled step, the engine on GPU.

Skipped (with a reason naming the GPU, which is the one skip the suite allows) where torch sees no
CUDA device; `benchmarks/run_gpu.sh` runs them with the GPU benchmarks on a machine that has one.
"""

import pytest
import torch
import torch.nn.functional as F

import convnext

from helpers import perturb

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")]


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto", "convnext_tiny"])
def test_gpu_logits_equal_cpu_logits_fp32(name, monkeypatch):
    model = perturb(convnext.create_model(name, num_classes=10))
    x = torch.randn(4, 3, 96, 96)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (restored after the test)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    assert (gpu - cpu).abs().max().item() <= 1e-4


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_steps_stay_finite_on_v2(precision):
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    model = perturb(convnext.create_model("convnextv2_atto", num_classes=10)).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    x, y = torch.randn(8, 3, 128, 128, device="cuda") * 20, torch.randint(0, 10, (8,), device="cuda")
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = perturb(convnext.create_model("convnextv2_atto", num_classes=10)).cuda().train()
    compiled = torch.compile(model)
    x, y = torch.randn(8, 3, 96, 96, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    eager_loss = F.cross_entropy(model(x), y)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled_loss = F.cross_entropy(compiled(x), y)
    compiled_loss.backward()
    assert abs(compiled_loss.item() - eager_loss.item()) <= 1e-3
    for g, p in zip(eager_grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_the_engine_trains_on_the_gpu_in_fp16_with_its_grad_scaler_and_in_bf16(tmp_path, precision):
    """The engine's own fp16 path (GradScaler through `fit`, not a hand-written loop) and bf16, on the GPU."""
    from convnext.data.fashion_mnist import prepare
    from convnext.train import ClassificationTask, TrainConfig, fit

    data = prepare(tmp_path / "fm", per_class={"train": 30, "val": 10})
    summary = fit(ClassificationTask(TrainConfig(
        model="convnextv2_atto", data=str(data), output=str(tmp_path / "run"), input_size=32, epochs=3, batch_size=32,
        lr=2e-3, warmup_epochs=0.5, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, crop_pct=1.0, workers=0,
        precision=precision, device="cuda", progress=False)))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert summary["best"] > 20.0 and summary.get("nan_skipped", 0) == 0  # chance is 10%
    assert (state["scaler"].get("scale", 0) > 0) == (precision == "fp16")  # the scaler ran in fp16 only


def test_the_engine_trains_on_the_gpu(tmp_path):
    from convnext.data.fashion_mnist import prepare
    from convnext.train import ClassificationTask, TrainConfig, fit

    data = prepare(tmp_path / "fm", per_class={"train": 30, "val": 10})
    summary = fit(ClassificationTask(TrainConfig(
        model="convnext_atto", data=str(data), output=str(tmp_path / "run"), input_size=32, epochs=3, batch_size=32,
        lr=2e-3, warmup_epochs=0.5, aa="none", reprob=0.0, mixup=0.0, cutmix=0.0, crop_pct=1.0, workers=0,
        precision="bf16", device="cuda", progress=False)))
    assert summary["best"] > 20.0  # chance is 10%


def test_imagenet_eval_on_cuda_counts_what_the_cpu_counts(tmp_path, monkeypatch):
    """`convnext eval --device cuda`: uint8 batches pinned and normalised on the GPU, channels_last, autocast."""
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from convnext.data.imagenet import synsets
    from convnext.eval.classify import evaluate_checkpoint

    torch.manual_seed(0)
    model = perturb(convnext.create_model("convnext_atto"), std=0.02)
    path = tmp_path / "atto.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    rng = np.random.default_rng(0)
    for c in synsets("imagenet-1k")[:8]:
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 is fp32: the same answers as the CPU
    kw = dict(progress=False, batch_size=8, input_size=64)
    cpu = evaluate_checkpoint(path, tmp_path / "val", device="cpu", optimize=False, **kw)
    for device, precision in (("cuda", "fp32"), ("cuda:0", "fp16"), ("auto", "bf16")):
        gpu = evaluate_checkpoint(path, tmp_path / "val", device=device, precision=precision, **kw)
        assert gpu["device"] == "cuda:0" and gpu["count"] == cpu["count"] == 24 and gpu["img_s"] > 0
        assert gpu["loss"] == pytest.approx(cpu["loss"], rel=2e-2 if precision != "fp32" else 1e-4)
        if precision == "fp32":
            assert gpu["acc1"] == cpu["acc1"] and gpu["acc5"] == cpu["acc5"]


def test_gpu_decoding_on_cuda_equals_the_cpu_device_path(tmp_path):
    """`--decode gpu` with nvJPEG: the same crops, flips and augmentation as the CPU-device path (tests/test_decode.py
    checks that one against `--decode cpu`), within the decoders' rounding."""
    import numpy as np
    from PIL import Image

    from convnext.data import ImageFolder, collate, train_transform
    from convnext.data.decode import augment_on_device

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        x = np.linspace(0, 255, 320)[None, :, None] * np.ones((240, 1, 3)) + rng.normal(0, 6, (240, 320, 3))
        Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(tmp_path / "a" / f"{i}.jpg", quality=92)
    ds = ImageFolder(tmp_path, train_transform(64), seed=0)
    ds.decode = "gpu"
    batch = collate([ds[(0, i)] for i in range(8)])
    augment = train_transform(64, scale=(0.5, 1.0), aa="none", reprob=0, tensors=True)
    on_cpu = augment_on_device(batch.inputs, augment, torch.device("cpu"))
    on_gpu = augment_on_device(batch.inputs, augment, torch.device("cuda"))
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert b.is_cuda and (a - b.cpu()).abs().mean() < 2 / 255 / 0.225
