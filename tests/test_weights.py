"""The safe loader, our safetensors format, the pretrained table and downloads (all offline)."""

import hashlib
import json
from pathlib import Path
import re
import pickle
import zipfile

import pytest
import torch

import convnext
from convnext.weights import PRETRAINED, CheckpointError, download, read_checkpoint
from convnext.weights.io import sha256_file


class _Payload:
    """Unpickling this runs `touch <marker>`: the loader must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        convnext.create_model("convnext_atto", pretrained=path)
    assert not marker.exists()


def test_raw_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["empty", "truncated_pth", "truncated_safetensors", "lfs_pointer", "garbage"])
def test_broken_files_give_one_clear_error(kind, tmp_path):
    good = convnext.create_model("convnext_atto")
    if kind == "empty":
        path = tmp_path / "w.pth"
        path.touch()
    elif kind == "truncated_pth":
        path = tmp_path / "w.pth"
        torch.save(good.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated_safetensors":
        path = tmp_path / "w.safetensors"
        convnext.save_checkpoint(good, path)
        path.write_bytes(path.read_bytes()[:-1000])
    elif kind == "lfs_pointer":
        path = tmp_path / "w.bin"
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    else:
        path = tmp_path / "w.pt"
        path.write_bytes(b"\x00not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    if kind == "lfs_pointer":
        assert "LFS" in msg
    if kind == "empty":
        assert "empty" in msg


def test_missing_file_and_bad_layout(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        convnext.load_checkpoint(convnext.create_model("convnext_atto"), tmp_path / "other.pth")


def test_strict_loading_lists_mismatched_keys(tmp_path):
    sd = convnext.create_model("convnext_atto").state_dict()
    sd.pop("stages.1.blocks.0.norm.weight")
    sd["stages.9.blocks.0.extra.weight"] = torch.zeros(1)
    model = convnext.create_model("convnext_atto")
    with pytest.raises(CheckpointError, match=r"missing 1: stages\.1\.blocks\.0\.norm\.weight.*unexpected 1"):
        convnext.load_checkpoint(model, sd)
    # Another architecture is named, with how to fix it.
    torch.save(convnext.create_model("convnext_femto").state_dict(), tmp_path / "femto.pth")
    with pytest.raises(ValueError, match="holds a convnext_femto"):
        convnext.create_model("convnext_atto", pretrained=tmp_path / "femto.pth")


def test_head_and_stem_adapt_and_say_so(tmp_path, caplog):
    src = convnext.create_model("convnext_atto", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with caplog.at_level("INFO"):
        m = convnext.create_model("convnext_atto", pretrained=tmp_path / "w.pth", num_classes=10, in_chans=1)
    assert "classifier re-initialised: checkpoint has 1000 classes, model 10" in caplog.text
    assert "adapting stem from 3 to 1 input channels" in caplog.text
    torch.testing.assert_close(m.stem.conv.weight, src.stem.conv.weight.sum(1, keepdim=True))
    assert torch.equal(m.stages[3].blocks[1].pwconv2.weight, src.stages[3].blocks[1].pwconv2.weight)
    # A grey image through the adapted stem equals its RGB copy through the original.
    g = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.eval().forward_features(g), src.eval().forward_features(g.expand(1, 3, 64, 64)))
    # num_classes=None keeps the checkpoint's classifier.
    assert convnext.create_model("convnext_atto", pretrained=tmp_path / "w.pth").num_classes == 1000


def test_save_checkpoint_metadata_rebuilds_the_model(tmp_path):
    src = convnext.create_model("convnextv2_atto", num_classes=4, head_init_scale=0.5)
    convnext.save_checkpoint(src, tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["format"], meta["version"], meta["task"]) == ("convnext", "3", "classify")  # the one header
    spec = json.loads(meta["spec"])
    assert spec["model_name"] == "convnextv2_atto" and spec["model_config"]["num_classes"] == 4
    m = convnext.create_model("convnextv2_atto", pretrained=tmp_path / "m.safetensors")
    assert m.num_classes == 4 and m.cfg.head_init_scale == 0.5
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values(), strict=True))


def test_pretrained_table_is_complete():
    sizes_v1 = ("tiny", "small", "base", "large")
    for s in sizes_v1:
        for tag in ("fb_in1k", "fb_in22k", "fb_in22k_ft_in1k", "fb_in22k_ft_in1k_384", "tv_in1k"):
            assert f"convnext_{s}.{tag}" in PRETRAINED
    assert {"convnext_xlarge.fb_in22k", "convnext_xlarge.fb_in22k_ft_in1k_384", "convnext_base.fb_in1k_384",
            "convnext_isotropic_large.fb_in1k", "convnextv2_huge.fcmae_ft_in22k_in1k_512"} <= set(PRETRAINED)
    for s in ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"):
        assert {f"convnextv2_{s}.fcmae", f"convnextv2_{s}.fcmae_ft_in1k"} <= set(PRETRAINED)
    for tag, w in PRETRAINED.items():
        assert tag.split(".")[0] in convnext.list_models(), tag
        assert w.url.startswith("https://") and w.num_classes in (0, 1000, 21841)
        assert 0 < w.preprocess.crop_pct <= 1 and w.preprocess.input_size in (224, 384, 512) and w.license
        assert (w.num_classes == 21841) == ("in22k" in tag and "ft" not in tag)
    assert PRETRAINED["convnext_tiny.tv_in1k"].sha256 == "983f1562"
    assert PRETRAINED["convnext_tiny.fb_in1k"].top1 == 82.1 and PRETRAINED["convnextv2_huge.fcmae_ft_in22k_in1k_512"].top1 == 88.9
    assert PRETRAINED["convnextv2_tiny.fcmae"].license == "cc-by-nc-4.0"


def _serve(tmp_path, model, name="w.pth"):
    """A local file reachable through a file:// URL: the real download code path, no network."""
    path = tmp_path / "server" / name
    path.parent.mkdir(exist_ok=True)
    torch.save({"model": convnext.weights.from_ours(model.state_dict(), "official")}, path)
    return path, path.as_uri()


def test_download_verifies_published_hash(tmp_path):
    path, url = _serve(tmp_path, convnext.create_model("convnext_atto"))
    digest = sha256_file(path)
    got = download(url, sha256=digest, progress=False)
    assert got.read_bytes() == path.read_bytes()
    assert download(url, sha256=digest[:8], progress=False) == got  # cached, prefix accepted
    got.write_bytes(got.read_bytes()[:-1] + b"!")  # the cached file changes on disk
    with pytest.raises(CheckpointError, match="differs from the published"):
        download(url, sha256=digest, progress=False)
    got.unlink()
    with pytest.raises(CheckpointError, match="does not match the published"):
        download(url, sha256="0" * 64, progress=False)
    assert not got.exists() and not list(got.parent.glob("*.part"))  # nothing half-written is left


def test_download_records_unknown_hash_and_refuses_later_change(tmp_path):
    path, url = _serve(tmp_path, convnext.create_model("convnext_atto"), name="convnext_atto_x.pth")
    got = download(url, progress=False)
    record = got.with_name(got.name + ".sha256")
    assert record.read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert download(url, progress=False) == got
    got.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="recorded"):
        download(url, progress=False)


def test_offline_download_says_how_to_pass_a_local_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        download("file:///nonexistent/dir/convnext_tiny_1k_224_ema.pth", progress=False)
    msg = str(e.value)
    assert "offline" in msg and "pretrained='/path/to/convnext_tiny_1k_224_ema.pth'" in msg and "\n" not in msg


def test_pretrained_tag_uses_the_cache(tmp_path, monkeypatch):
    """A tag resolves to its URL's file name in the cache; a torchvision file with a wrong hash is refused."""
    import torchvision

    from convnext.utils import cache_dir

    tv = torchvision.models.convnext_tiny()
    info = PRETRAINED["convnext_tiny.tv_in1k"]
    cache_dir().mkdir(parents=True)
    torch.save(tv.state_dict(), cache_dir() / info.filename)  # hash won't start with 983f1562
    with pytest.raises(CheckpointError, match="983f1562"):
        convnext.create_model("convnext_tiny", pretrained="convnext_tiny.tv_in1k")

    src = convnext.create_model("convnext_atto")
    info = PRETRAINED["convnext_atto.d2_in1k"]
    path = cache_dir() / info.filename
    torch.save(convnext.weights.from_ours(src.state_dict(), "timm"), path)
    monkeypatch.setitem(PRETRAINED, "convnext_atto.d2_in1k",
                        type(info)(**{**info.__dict__, "sha256": sha256_file(path)}))
    m = convnext.create_model("convnext_atto.d2_in1k", pretrained=True)
    assert torch.equal(m.stem.conv.weight, src.stem.conv.weight)
    assert m.pretrained_cfg.preprocess.crop_pct == 0.875


def test_unknown_tag_suggests(tmp_path):
    with pytest.raises(ValueError, match="did you mean convnext_tiny.fb_in1k"):
        convnext.create_model("convnext_tiny", pretrained="convnext_tiny.fb_in1kk")
    with pytest.raises(ValueError, match="are for convnext_base"):
        convnext.create_model("convnext_tiny", pretrained="convnext_base.fb_in1k")
    with pytest.raises(ValueError, match="no pretrained weights"):
        convnext.create_model("convnextv2_small", pretrained=True)


def test_zip_without_data_is_reported(tmp_path):
    path = tmp_path / "w.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/version", "3")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path)


# --- Never load wrong weights silently (issue 10, points 1 and 2) -----------------------------------

@pytest.mark.parametrize("key", ["stages.0.blocks.0.pwconv1.weight", "head.fc.weight"])
def test_a_transposed_tensor_with_the_same_size_is_a_shape_error(key, tmp_path):
    sd = convnext.create_model("convnext_atto", num_classes=10).state_dict()
    sd[key] = sd[key].t().contiguous()  # same number of elements, wrong layout
    with pytest.raises(CheckpointError, match=rf"shape mismatch 1: {re.escape(key)}"):
        convnext.load_checkpoint(convnext.create_model("convnext_atto", num_classes=10), sd)
    torch.save(sd, tmp_path / "t.pth")
    with pytest.raises(ValueError, match=re.escape(key)):  # also through create_model (which adapts heads)
        convnext.create_model("convnext_atto", pretrained=tmp_path / "t.pth", num_classes=10)


def test_only_documented_layout_differences_are_reshaped():
    model = convnext.create_model("convnextv2_atto", num_classes=10)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["stages.0.blocks.0.pwconv1.weight"] = sd["stages.0.blocks.0.pwconv1.weight"][..., None, None]  # timm conv-MLP
    sd["stages.0.blocks.0.grn.gamma"] = sd["stages.0.blocks.0.grn.gamma"].reshape(1, 1, 1, -1)  # official / HF GRN
    convnext.load_checkpoint(model, sd)
    sd["stages.0.blocks.0.grn.beta"] = sd["stages.0.blocks.0.grn.beta"].reshape(-1, 1)  # not a documented layout
    with pytest.raises(CheckpointError, match=r"grn\.beta \(160, 1\)"):
        convnext.load_checkpoint(model, sd)


def test_a_checkpoint_of_another_family_names_the_right_model(tmp_path):
    torch.save({"model": convnext.weights.from_ours(convnext.create_model("convnextv2_tiny").state_dict(),
                                                    "official")}, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"ConvNeXt V2 \(GRN\) convnextv2_tiny, not convnext_tiny"):
        convnext.create_model("convnext_tiny", pretrained=tmp_path / "v2.pth")
    torch.save(convnext.create_model("convnext_atto").state_dict(), tmp_path / "v1.pth")
    with pytest.raises(ValueError, match="convnext_atto, not convnextv2_atto"):
        convnext.create_model("convnextv2_atto", pretrained=tmp_path / "v1.pth")
    convnext.save_checkpoint(convnext.create_model("convnextv2_atto"), tmp_path / "ours.safetensors")
    with pytest.raises(ValueError, match="holds a convnextv2_atto"):
        convnext.create_model("convnext_atto", pretrained=tmp_path / "ours.safetensors")
    v1_no_ls = convnext.create_model("convnext_atto", ls_init_value=None).state_dict()
    with pytest.raises(ValueError, match="has no LayerScale"):
        convnext.create_model("convnext_atto", pretrained=v1_no_ls)
    assert convnext.create_model("convnext_atto", pretrained=v1_no_ls, ls_init_value=None).stages[0].blocks[0].gamma is None


# --- Every unreadable file: one error class, one line, never an unsafe advice, never code (point 8) ---

@pytest.mark.parametrize("content", [b"hello world", b'{"model": {"w": 1}}\n', b"# README\n\nConvNeXt weights\n",
                                     bytes(range(256)) * 3])
def test_text_and_random_files_are_not_checkpoints(content, tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path)
    msg = str(e.value)
    assert "not a PyTorch checkpoint or safetensors file" in msg and str(path) in msg
    assert "weights_only=False" not in msg and "\n" not in msg


def _good_files(tmp_path):
    sd = {"w": torch.arange(24.0).reshape(4, 6), "b": torch.zeros(3)}
    torch.save({"model": sd}, tmp_path / "good.pth")
    convnext.weights.write_safetensors(tmp_path / "good.safetensors", sd, {"format": "x"})
    torch.save({"model": sd}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    evil = pickle.dumps({"w": _Payload(tmp_path / "pwned")}, protocol=2)
    return [(tmp_path / n).read_bytes() for n in ("good.pth", "good.safetensors", "legacy.pth")] + [evil]


def _read_never_crashes(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        obj, _ = read_checkpoint(path)
        assert isinstance(obj, dict)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)


def test_random_bytes_text_and_truncations_only_raise_checkpoint_error(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = _good_files(tmp_path)
    marker = tmp_path / "pwned"
    ok = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)

    @ok
    @given(st.binary(min_size=1, max_size=3000), st.sampled_from([".pth", ".pt", ".bin", ".safetensors"]))
    def random_bytes(data, suffix):
        _read_never_crashes(tmp_path, "r" + suffix, data)

    @ok
    @given(st.text(min_size=1, max_size=500))
    def random_text(text):
        _read_never_crashes(tmp_path, "t.pth", text.encode("utf-8", "surrogatepass"))

    @ok
    @given(st.integers(0, 3), st.floats(0, 1), st.integers(0, 255), st.booleans())
    def damaged(which, where, byte, flip):
        data = bytearray(good[which])
        cut = int(where * len(data))
        if flip and cut < len(data):
            data[cut] = byte  # one corrupted byte
        else:
            data = data[:max(cut, 1)]  # truncated
        _read_never_crashes(tmp_path, ["d.pth", "d.safetensors", "d.pth", "d.pkl"][which], bytes(data))

    random_bytes()
    random_text()
    damaged()
    assert not marker.exists()  # no damaged copy of the malicious pickle ever ran its payload


# --- files written before the one header (version 3): fixtures written by that code (tests/fixtures) -----

V2 = Path(__file__).parent / "fixtures" / "v2"


def _fixture(tmp_path, name):
    import lzma
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    from make_v2_fixtures import fill

    path = tmp_path / name
    path.write_bytes(lzma.decompress((V2 / f"{name}.xz").read_bytes()))
    return path, fill


def _assert_filled(model, fill, prefix="", skip=()):
    """Every floating-point tensor holds the constant of its key: each one arrived, under its own name."""
    sd = model.state_dict()
    floats = {k: v for k, v in sd.items() if v.is_floating_point() and not k.startswith(skip)}
    assert floats
    for k, v in floats.items():
        assert torch.allclose(v.float(), torch.full_like(v.float(), fill(prefix + k))), k


@pytest.mark.parametrize("name,task", [
    ("classify_best.safetensors", "classify"), ("classify_last.pt", "classify"),
    ("converted_ours.safetensors", "classify"), ("converted_official.safetensors", "classify"),
    ("detect_best.safetensors", "detect"), ("detect_last.pt", "detect"),
    ("segment_best.safetensors", "segment"), ("segment_last.pt", "segment"),
    ("pretrain_best.safetensors", "pretrain"), ("pretrain_last.pt", "pretrain"),
    ("converted_fcmae.pt", "pretrain"), ("converted_fcmae.safetensors", "pretrain"),
])
def test_files_written_before_the_one_header_still_load(tmp_path, name, task):
    from convnext.weights import read_model_file

    path, fill = _fixture(tmp_path, name)
    file = read_model_file(path)
    # (convert --to fcmae's .pt is the official layout as the official code writes it: no header of ours)
    assert file.task == task and file.version == (0 if name == "converted_fcmae.pt" else 2)
    assert file.model_name in ("convnext_atto", "convnextv2_atto")
    if task == "classify":
        from convnext.factory import load_for_inference

        model, info = load_for_inference(path)
        assert info.model_name == "convnext_atto"
        if name.startswith("classify"):  # a training run's files: its classes and preprocessing
            assert info.classes == ["cat", "dog"] and info.preprocess.input_size == 32
        _assert_filled(model, fill)
        if name == "classify_last.pt":
            ema, _ = load_for_inference(path, key="model_ema")
            _assert_filled(ema, fill, prefix="module.")  # (torch's AveragedModel wraps the EMA model)
    elif task in ("detect", "segment"):
        from convnext.eval.dense import load_detector, load_segmenter

        model, spec = (load_detector if task == "detect" else load_segmenter)(path)
        assert spec["model_name"] == "convnext_atto" and spec["classes"]
        _assert_filled(model, fill)
    else:
        from convnext.fcmae import load_fcmae_file

        model = load_fcmae_file(path)
        assert model.model_name == "convnextv2_atto" and model.decoder_dim == 32
        if not name.startswith("converted"):  # (the official layout renames keys: checked through the encoder)
            _assert_filled(model, fill)
        encoder = convnext.create_model("convnextv2_atto", pretrained=path, num_classes=0)
        if not name.startswith("converted"):
            _assert_filled(encoder, fill, prefix="encoder.", skip=("head.",))  # (an encoder has no final norm)


def test_a_training_state_written_before_the_one_header_resumes_its_identity(tmp_path):
    """The engine reads an old last.pt's identity (model name, classes, preprocessing) as today's header spec."""
    from convnext.train.classification import ClassificationTask
    from convnext.train.config import ClassifyConfig
    from convnext.weights import read_model_file

    path, _ = _fixture(tmp_path, "classify_last.pt")
    task = ClassificationTask(ClassifyConfig(model="convnext_atto", data="x", input_size=32))
    task.classes = ["cat", "dog"]
    file = read_model_file(path)
    assert {"task": file.task, "spec": file.spec} == task.identity()
    assert file.training_state()["progress"]["step"] == 2
