"""Data: robust decoding, folder validation, the recipe's transforms and Mixup/CutMix statistics."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from convnext.data import (DataError, ImageFolder, check_same_classes, eval_transform, load_rgb, mixup_cutmix,
                           parse_aa, train_transform)
from convnext.data.transforms import RandAugment
from convnext.preprocess import Preprocess


def make_bad_folder(root):
    """One class of good images in every tricky format, plus the unreadable ones."""
    d = root / "things"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "rgb.jpg")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # pure red in CMYK
    rgba = Image.new("RGBA", (40, 30), (0, 0, 255, 0))  # fully transparent blue -> white background
    rgba.save(d / "rgba.png")
    pal = Image.new("P", (40, 30), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(d / "palette.png")
    Image.new("I;16", (40, 30), 65535).save(d / "sixteen_bit.png")
    exif_img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = exif_img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif_img.save(d / "exif_rotated.jpg", exif=exif)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.png").touch()
    (d / "text.jpg").write_text("this is not a jpeg")
    return d


def test_decoding_every_mode_correctly(tmp_path):
    d = make_bad_folder(tmp_path)
    assert load_rgb(d / "rgb.jpg").mode == "RGB"
    r, g, b = load_rgb(d / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60
    assert load_rgb(d / "rgba.png").getpixel((5, 5)) == (255, 255, 255)
    assert load_rgb(d / "palette.png").getpixel((5, 5)) == (0, 200, 0)
    assert load_rgb(d / "sixteen_bit.png").getpixel((5, 5)) == (255, 255, 255)
    half = tmp_path / "half.png"
    Image.new("I;16", (4, 4), 32896).save(half)  # mid-grey in 16 bit -> 128, not clipped to 255
    assert load_rgb(half).getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(d / "exif_rotated.jpg").size == (20, 40)  # EXIF orientation applied
    for bad in ("truncated.jpg", "empty.png", "text.jpg"):
        with pytest.raises(OSError):  # PIL's UnidentifiedImageError is an OSError too
            load_rgb(d / bad)


def test_dataset_marks_bad_images_instead_of_crashing(tmp_path):
    make_bad_folder(tmp_path / "train")
    ds = ImageFolder(tmp_path / "train", transform=eval_transform(Preprocess(32, crop_pct=1.0)))
    out = {ds.samples[i][0].rsplit("/", 1)[1]: ds[(0, i)] for i in range(len(ds))}
    for bad in ("truncated.jpg", "empty.png", "text.jpg"):
        assert out[bad][0] is None
    for good in ("rgb.jpg", "cmyk.jpg", "rgba.png", "palette.png", "sixteen_bit.png", "exif_rotated.jpg"):
        assert out[good][0].shape == (3, 32, 32)


def test_folder_validation_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        ImageFolder(tmp_path / "a")
    (tmp_path / "a" / "cat").mkdir()
    (tmp_path / "a" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "cat" / "1.png")
    with pytest.raises(DataError, match="no images: dog"):
        ImageFolder(tmp_path / "a")
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "dog" / "1.png")
    (tmp_path / "b" / "cat").mkdir(parents=True)
    (tmp_path / "b" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "cat" / "1.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "bird" / "1.png")
    with pytest.raises(DataError, match="class mismatch"):
        check_same_classes(ImageFolder(tmp_path / "a"), ImageFolder(tmp_path / "b"))
    with pytest.raises(DataError, match="does not know: bird"):
        ImageFolder(tmp_path / "b", classes=["cat", "dog"])


def test_sample_augmentation_is_seeded_by_epoch_and_index(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (50, 40), (i * 40, 100, 200 - i * 50)).save(d / f"{i}.png")
    ds = ImageFolder(tmp_path, transform=train_transform(32), seed=7)
    a, b = ds[(3, 1)][0], ds[(3, 1)][0]
    assert torch.equal(a, b)
    torch.manual_seed(123)  # the global RNG does not matter, and is left as it was
    before = torch.random.get_rng_state()
    assert torch.equal(ds[(3, 1)][0], a)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(ds[(4, 1)][0], a)


def test_train_transform_statistics():
    img = Image.new("RGB", (80, 60), (124, 116, 104))  # ImageNet mean colour
    t = train_transform(64, aa="none", color_jitter=0, reprob=0)
    x = t(img)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.abs().max() < 0.02  # the mean colour normalises to ~0
    erase = train_transform(64, aa="none", color_jitter=0, reprob=0.25)
    hits = sum(bool((erase(img).abs() > 0.5).any()) for _ in range(400))
    assert 0.17 < hits / 400 < 0.33  # random erasing with probability 0.25 (per-pixel noise)


def test_randaugment_spec():
    ra = parse_aa("rand-m9-mstd0.5-inc1", (124, 116, 104))
    assert isinstance(ra, RandAugment) and ra.num_ops == 2 and ra.mean_magnitude == 9 and ra.magnitude_std == 0.5
    assert ra.num_magnitude_bins == 11  # magnitude 9 of 10, as timm
    assert parse_aa("rand-n3-m10", (0, 0, 0)).num_ops == 3
    assert parse_aa("none", (0, 0, 0)) is None
    with pytest.raises(ValueError, match="unknown auto-augment"):
        parse_aa("autoaug-v0", (0, 0, 0))
    out = train_transform(48)(Image.new("RGB", (60, 60), (10, 200, 30)))
    assert out.shape == (3, 48, 48)


def test_eval_transform_crop_pct_and_no_crop_at_384():
    img = Image.new("RGB", (400, 300), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 400, 10))  # white band along the top edge
    x = eval_transform(Preprocess(224, crop_pct=0.875))(img)
    assert x.shape == (3, 224, 224)
    assert x[:, :2].mean() < 0  # resize 256 + center crop cuts the top band away
    y = eval_transform(Preprocess(384))(img)
    assert y.shape == (3, 384, 384) and y[:, :4].mean() > 1  # whole image squashed, band kept


def test_mixup_cutmix_targets_and_switch_probability():
    n, k = 16, 10
    mix = mixup_cutmix(k, mixup=0.8, cutmix=1.0, switch_prob=0.5)
    x = torch.rand(n, 3, 32, 32)
    y = torch.arange(n) % k
    cut = 0
    torch.manual_seed(0)
    for _ in range(300):
        xm, ym = mix(x, y)
        assert ym.shape == (n, k)
        torch.testing.assert_close(ym.sum(1), torch.ones(n))
        # CutMix copies pixels verbatim from the rolled batch; MixUp blends every pixel.
        same = ((xm == x) | (xm == x.roll(1, 0))).all(1).float().mean()
        cut += bool(same > 0.999)
    assert 0.4 < cut / 300 < 0.6
    assert mixup_cutmix(k, mixup=0, cutmix=0) is None


def test_the_classification_loss_is_label_smoothed_cross_entropy_on_mixed_targets():
    """The task's own loss (not torch's) on a known batch equals timm's smoothed mixed-target formula, and
    --smoothing 0 changes it (the recipe's value reaches the loss)."""
    from convnext.data import Batch
    from convnext.train.classification import ClassificationTask
    from convnext.train.config import ClassifyConfig

    logits, images = torch.randn(8, 10), torch.rand(8, 3, 32, 32)

    class Fixed(torch.nn.Module):  # returns the known logits
        def forward(self, x):
            return logits

    def loss(**kw):
        task = ClassificationTask(ClassifyConfig(model="convnext_atto", data="x", **kw))
        task.classes = [str(i) for i in range(10)]
        task.mix = mixup_cutmix(10, mixup=0.8, cutmix=0.0)
        batch = Batch(images, torch.arange(8), list(range(8)))
        torch.manual_seed(1)  # the engine seeds each step
        return task.loss(Fixed(), batch, torch.device("cpu"))["loss"]

    eps = 0.1
    torch.manual_seed(1)  # the same draw of the mixing coefficient as inside loss()
    _, soft = mixup_cutmix(10, mixup=0.8, cutmix=0.0)(images, torch.arange(8))
    smoothed = soft * (1 - eps) + eps / 10  # timm: smoothing folded into the mixed one-hot targets
    timm_loss = (-smoothed * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss(smoothing=eps), timm_loss)
    plain = (-soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss(smoothing=0.0), plain)
    assert abs(float(loss(smoothing=eps) - loss(smoothing=0.0))) > 1e-3


def test_write_once_builds_once_and_leaves_nothing_half_written(tmp_path):
    from convnext.data.folder import write_once

    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "a.txt").write_text("x")

    root = write_once(tmp_path / "gen", "v1", build)
    assert (root / "a.txt").read_text() == "x" and (root / ".complete").read_text() == "v1"
    write_once(tmp_path / "gen", "v1", build)
    assert len(calls) == 1  # complete with the same marker: kept

    def broken(tmp):
        (tmp / "half.txt").write_text("y")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_once(tmp_path / "gen", "v2", broken)
    assert not (tmp_path / "gen.partial").exists() and (root / ".complete").read_text() == "v1"


def test_randaugment_applies_its_ops_with_timm_magnitude_noise():
    """rand-m9-mstd0.5: two ops per image that change it, magnitudes drawn from N(9, 0.5) (rounded to the
    torchvision bins), and exactly 9 without noise; a broken (identity or fixed-magnitude) RandAugment fails."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    ra = parse_aa("rand-m9-mstd0.5-inc1", (124, 116, 104))
    torch.manual_seed(0)
    mags, changed = [], 0
    for _ in range(400):
        out = ra(img)
        mags.append(ra.magnitude)
        changed += not np.array_equal(np.asarray(out), np.asarray(img))
    mags = np.array(mags)
    assert changed / 400 > 0.85  # (identity is one op of 14: both draws identity ~0.5%)
    assert abs(mags.mean() - 9) < 0.1 and 0.35 < mags.std() < 0.7 and set(mags) <= {7, 8, 9, 10}
    fixed = parse_aa("rand-m9", (0, 0, 0))
    for _ in range(20):
        fixed(img)
        assert fixed.magnitude == 9


def test_mixup_lambda_is_beta_and_cutmix_label_weight_is_the_pasted_area():
    """MixUp: the label weight of a sample's own class is lambda ~ Beta(alpha, alpha) (mean 1/2, variance
    1 / (4 (2 alpha + 1))); the image is lambda x + (1 - lambda) x_rolled. CutMix: the weight of the pasted
    class equals the share of pasted pixels, exactly."""
    n, k, alpha = 4, 10, 0.8
    y = torch.arange(n)  # distinct labels: each weight is read off alone
    mixup = mixup_cutmix(k, mixup=alpha, cutmix=0.0)
    torch.manual_seed(0)
    lams = []
    for _ in range(3000):
        x = torch.rand(n, 3, 8, 8)
        xm, ym = mixup(x, y)
        lam = ym[0, 0].item()
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))
        lams.append(lam)
    lams = np.array(lams)
    assert abs(lams.mean() - 0.5) < 0.02 and abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.008
    cutmix = mixup_cutmix(k, mixup=0.0, cutmix=1.0)
    for _ in range(200):
        x = torch.rand(n, 3, 16, 16)
        xm, ym = cutmix(x, y)
        pasted = (xm != x).any(1).float().mean((1, 2))  # share of pixels from the rolled batch
        torch.testing.assert_close(1 - ym[:, :].gather(1, y[:, None])[:, 0], pasted, atol=1e-6, rtol=0)


def test_drop_path_drops_whole_samples_and_rescales_by_keep():
    from convnext.models.layers import DropPath

    dp = DropPath(0.3).train()
    torch.manual_seed(0)
    out = dp(torch.ones(20000, 4, 3, 3))
    per_sample = out.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample, not per element
    values = per_sample[:, 0].unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.3) < 0.015
    assert abs(out.mean().item() - 1.0) < 0.02  # the 1/keep rescale keeps the expectation
    assert torch.equal(dp.eval()(torch.ones(3, 2)), torch.ones(3, 2))  # identity at inference
