"""`--decode cpu|cpu-draft|gpu` (data/decode.py): where training images are decoded.

cpu-draft must draw the crops `cpu` draws and decode JPEGs reduced only where the crop allows (bitwise `cpu`
everywhere else); gpu must decode and augment each image with `cpu`'s random draws on the device. The gpu path
runs here on the CPU device (torchvision's CPU JPEG decoder; `cuda_available` patched), so that everything but
nvJPEG is tested on every machine; tests/test_cuda.py runs it on CUDA.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_main

from convnext.data import ImageFolder, collate, train_transform
from convnext.data.decode import Encoded, augment_on_device, draft_scale

LEVEL = 1 / 255 / 0.225  # one level of 255, in normalised units (the largest ImageNet std)


def _gradient(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth picture with some texture: flips and crops show as large differences, rounding as small ones."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * np.array([1.0, 0.6, 0.3])
    return (x + rng.normal(0, 6, x.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
    """Class folders with large and small JPEGs, a PNG, an EXIF-rotated JPEG and a JPEG cut short."""
    root = tmp_path / "data" / "train"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
    Image.fromarray(_gradient(480, 360, 0)).save(root / "a" / "0_large.jpg", quality=92)
    Image.fromarray(_gradient(400, 300, 1)).save(root / "a" / "1_large.jpg", quality=92)
    Image.fromarray(_gradient(40, 36, 2)).save(root / "a" / "2_small.jpg", quality=92)
    Image.fromarray(_gradient(200, 150, 3)).save(root / "b" / "3_picture.png")
    rotated = Image.fromarray(_gradient(300, 200, 4))
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    rotated.save(root / "b" / "4_rotated.jpg", quality=92, exif=exif)
    buf = io.BytesIO()
    Image.fromarray(_gradient(300, 200, 5)).save(buf, "JPEG", quality=92)
    (root / "b" / "5_cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root


def _datasets(root, decode: str, **kw):
    cpu = ImageFolder(root, train_transform(32, **kw), seed=3)
    other = ImageFolder(root, train_transform(32, draft=decode == "cpu-draft", **kw), seed=3)
    other.decode = decode
    return cpu, other


def test_draft_scale_keeps_the_crop_at_least_the_output_size():
    assert draft_scale(480, 300, 32, 32) == 8 and draft_scale(255, 300, 32, 32) == 4
    assert draft_scale(100, 100, 64, 64) == 1 and draft_scale(128, 64, 32, 32) == 2


def test_cpu_draft_draws_the_crops_of_cpu_and_decodes_jpegs_reduced(photos, monkeypatch):
    from PIL import JpegImagePlugin

    asked = []
    real = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: asked.append(size) or real(self, mode, size))
    # the whole recipe (RandAugment, random erasing), then crop and flip alone (rounding not amplified by it)
    for kw in ({"scale": (0.5, 1.0)}, {"scale": (0.5, 1.0), "aa": "none", "reprob": 0}):
        cpu, draft = _datasets(photos, "cpu-draft", **kw)
        names = [s[0].rsplit("/", 1)[-1] for s in cpu.samples]
        for epoch, (i, name) in ((e, x) for e in (0, 1) for x in enumerate(names)):
            asked.clear()
            a, b = cpu[(epoch, i)][0], draft[(epoch, i)][0]
            if name == "5_cut.jpg":
                assert a is None and b is None  # unreadable either way
                assert "truncated" in draft.unreadable_reason(i)
            elif "large" in name:
                assert asked and max(asked[0]) <= 240  # decoded at 1/2 .. 1/8 of its size
                assert not torch.equal(a, b)
                assert "aa" not in kw or (a - b).abs().mean() < LEVEL, name  # the same crop and flip
            else:  # a small crop, a PNG, an EXIF rotation: decoded whole, bitwise cpu's
                assert torch.equal(a, b), name


def test_gpu_decoding_augments_on_the_device_with_the_draws_of_cpu(photos):
    cpu, gpu = _datasets(photos, "gpu", scale=(0.5, 1.0), aa="none", reprob=0)
    items = [gpu[(1, i)] for i in range(len(gpu))]
    kinds = {s[0].rsplit("/", 1)[-1]: it[0] for s, it in zip(gpu.samples, items, strict=True)}
    assert kinds.pop("5_cut.jpg") is None  # no end marker: PIL decodes it in the worker, and fails
    assert all(isinstance(e, Encoded) for e in kinds.values())
    assert kinds["0_large.jpg"].jpeg is not None and kinds["0_large.jpg"].pixels is None  # left for the device
    assert kinds["3_picture.png"].pixels is not None  # PIL's, in the worker
    assert kinds["4_rotated.jpg"].pixels.shape[1:] == (300, 200)  # turned upright in the worker
    batch = collate(items)
    assert isinstance(batch.inputs, list) and len(batch.inputs) == 5 and len(batch.bad) == 1  # decoded by `prepare`
    images = augment_on_device(batch.inputs, train_transform(32, scale=(0.5, 1.0), aa="none", reprob=0),
                               torch.device("cpu"))
    for i, img in zip(batch.indices, images, strict=True):
        ref = cpu[(1, i)][0]
        assert img.shape == ref.shape and (img - ref).abs().mean() < LEVEL  # the same crop and flip
    damaged = Encoded(b"\xff\xd8\xff" + b"x" * 100 + b"\xff\xd9", None, 0)  # no decoder reads it
    assert augment_on_device([damaged, kinds["0_large.jpg"]], cpu.transform, torch.device("cpu"))[0] is None


def test_gpu_decoding_trains_through_the_engine_and_reports_bad_images(photos, tmp_path, capsys, caplog, monkeypatch):
    args = ["train", "--data", photos.parent, "--model", "convnext_atto", "--epochs", 1, "--batch-size", 3,
            "--input-size", 32, "--workers", 0, "--no-progress", "--threads", 1, "--mixup", 0, "--cutmix", 0]
    (photos.parent / "val").mkdir()
    for c in ("a", "b"):
        (photos.parent / "val" / c).mkdir()
        Image.fromarray(_gradient(64, 48, 9)).save(photos.parent / "val" / c / "v.jpg")
    code, _, err = run_main(capsys, *args, "--decode", "gpu", "--output", tmp_path / "no")
    assert code == 2 and "--decode gpu decodes on a CUDA device" in err
    code, _, err = run_main(capsys, *args, "--decode", "cpu-draft", "--cache-images", "--output", tmp_path / "no")
    assert code == 2 and "--cache-images keeps decoded images" in err
    code, _, err = run_main(capsys, *args, "--decode", "cpu-draft", "--output", tmp_path / "draft")
    assert code == 0, err
    monkeypatch.setattr("convnext.data.decode.cuda_available", lambda: True)  # the CPU device stands in
    code, _, err = run_main(capsys, *args, "--decode", "gpu", "--output", tmp_path / "gpu")
    assert code == 0, err
    assert "skipping unreadable image" in caplog.text and "5_cut.jpg (OSError: image file is truncated" in caplog.text
    line = json.loads((tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["bad_images"] == 1 and line["val_loss"] > 0
