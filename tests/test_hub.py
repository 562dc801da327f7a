"""Sharing models the way the ecosystem does (issue 23): Hub folders in timm's and transformers' layouts that
their own loaders load, `hf-hub:` names resolved from a local cache (offline), `convnext push` against a fake
Hub (only the HTTP layer mocked), and every layout in the container its owners load."""

import json
import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import perturb, run_main

import convnext
from convnext.factory import load_for_inference, save_pretrained
from convnext.preprocess import Preprocess
from convnext.weights import save_checkpoint

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (HF_HUB_OFFLINE must mean it)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args[1:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _checkpoint(tmp_path, name: str, pre: Preprocess) -> tuple:
    """A trained-looking run: best.safetensors with classes and preprocessing, config.yaml and metrics.jsonl."""
    torch.manual_seed(1)
    model = perturb(convnext.create_model(name, num_classes=3)).eval()
    run = tmp_path / f"run-{name}"
    run.mkdir()
    save_checkpoint(model, run / "best.safetensors", classes=CLASSES, preprocess=pre.to_dict())
    (run / "config.yaml").write_text(f"model: {name}\ndata: /data/pets\nfinetune: {name}.fcmae\nepochs: 3\n"
                                     f"batch_size: 32\nlr: 0.001\nseed: 0\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.9 / e,
                                                           "val_acc1": 50.0 + e}) + "\n" for e in (1, 2, 3)))
    return model, run / "best.safetensors"


def _photo(w: int = 300, h: int = 200) -> Image.Image:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_a_hub_folder_loads_in_timm_and_predicts_our_logits(name, tmp_path, capsys):
    import timm
    from timm.data import create_transform, resolve_data_config

    pre = Preprocess(input_size=64, crop_pct=0.9, interpolation="bilinear")
    model, ckpt = _checkpoint(tmp_path, name, pre)
    code, out, err = run_main(capsys, "export", "--format", "hub", "--checkpoint", ckpt, "--output", tmp_path / "hub")
    assert code == 0 and "timm.create_model('local-dir:DIR'" in out, err
    theirs = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (theirs(x) - model(x)).abs().max() <= 1e-4
    assert theirs.pretrained_cfg["label_names"] == CLASSES and theirs.num_classes == 3
    ours_t = load_for_inference(ckpt)[1].transform()
    timm_t = create_transform(**resolve_data_config({}, model=theirs))  # timm's eval transform from the config
    photo = _photo()
    assert (timm_t(photo) - ours_t(photo)).abs().max() <= 1e-5  # the same preprocessing, computed by timm
    card = (tmp_path / "hub" / "README.md").read_text()
    licence = "cc-by-nc-4.0" if "v2" in name else "other"  # the V2 FCMAE weights' licence; V1 has no FCMAE weights
    assert "library_name: timm" in card and f"license: {licence}" in card
    assert "| 3 | 0.3333 | 0.3 | 53 |" in card and "/data/pets" in card and f"{name}.fcmae" in card
    back_model, back = load_for_inference(f"local-dir:{tmp_path / 'hub'}")  # and back: the same model, classes, preprocessing
    assert back.classes == CLASSES and back.preprocess == pre and back.model_name == name
    with torch.no_grad():
        assert torch.equal(back_model(x), model(x))


@pytest.mark.parametrize("name", ["convnext_atto", "convnextv2_atto"])
def test_a_transformers_folder_loads_with_from_pretrained_and_predicts_our_logits(name, tmp_path, capsys):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    pre = Preprocess(input_size=64, crop_pct=0.8)  # (an even margin: their center crop floors it, timm's rounds)
    model, ckpt = _checkpoint(tmp_path, name, pre)
    code, _, err = run_main(capsys, "export", "--format", "transformers", "--checkpoint", ckpt, "--output",
                            tmp_path / "tf")
    assert code == 0, err
    theirs = AutoModelForImageClassification.from_pretrained(tmp_path / "tf").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (theirs(pixel_values=x).logits - model(x)).abs().max() <= 1e-4
    assert theirs.config.id2label == dict(enumerate(CLASSES))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "tf")
    photo = _photo()
    hf_pixels = processor(photo, return_tensors="pt")["pixel_values"][0]
    ours = load_for_inference(ckpt)[1].transform()(photo)
    assert hf_pixels.shape == ours.shape and (hf_pixels - ours).abs().mean() < 0.02  # (their resize's rounding)
    back = load_for_inference(tmp_path / "tf")[1]
    assert back.classes == CLASSES and back.preprocess == pre and back.model_name == name
    code, _, err = run_main(capsys, "export", "--format", "transformers", "--checkpoint", ckpt, "--output",
                            tmp_path / "tf")
    assert code == 2 and "exists; pass --force" in err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_main(capsys, "export", "--format", "hub", "--checkpoint", ckpt, "--output", tmp_path / "mine",
                            "--force")
    assert code == 2 and "holds other files (notes.txt)" in err and (tmp_path / "mine" / "notes.txt").is_file()


def test_a_preprocessing_transformers_cannot_compute_is_refused(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path, "convnext_atto", Preprocess(input_size=64, crop_mode="squash", crop_pct=0.9))
    code, _, err = run_main(capsys, "export", "--format", "transformers", "--checkpoint", ckpt)
    assert code == 2 and "ConvNextImageProcessor cannot compute" in err
    assert not (tmp_path / "run-convnext_atto" / "best-transformers").exists()


def _cache_repo(cache, repo: str, folder) -> None:
    """A Hub repo in a huggingface_hub cache, as `hf download` leaves it (refs/main -> a snapshot)."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / commit)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)


def test_hf_hub_names_resolve_from_the_local_cache_offline(tmp_path, capsys, monkeypatch, no_network):
    pre = Preprocess(input_size=64)
    model, ckpt = _checkpoint(tmp_path, "convnextv2_atto", pre)
    save_pretrained(load_for_inference(ckpt)[0], tmp_path / "a", classes=CLASSES, preprocess=pre)
    save_pretrained(model, tmp_path / "b", format="transformers", classes=CLASSES, preprocess=pre)
    cache = tmp_path / "hf" / "hub"
    _cache_repo(cache, "me/pets-timm", tmp_path / "a")
    _cache_repo(cache, "me/pets-hf", tmp_path / "b")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    x = torch.randn(2, 3, 64, 64)
    for repo in ("me/pets-timm", "me/pets-hf"):
        built = convnext.create_model(f"hf-hub:{repo}", pretrained=True).eval()
        with torch.no_grad():
            assert torch.equal(built(x), model(x)), repo
        _, info = load_for_inference(f"hf-hub:{repo}")
        assert info.classes == CLASSES and info.preprocess == pre
        tuned = convnext.create_model("convnextv2_atto", pretrained=f"hf-hub:{repo}", num_classes=7)
        assert tuned.num_classes == 7  # fine-tuning from a Hub model: the head re-initialised
    photo = tmp_path / "photo.jpg"
    _photo().save(photo)
    code, out, err = run_main(capsys, "predict", photo, "--checkpoint", "hf-hub:me/pets-hf", "--json", "--topk", 1)
    assert code == 0 and json.loads(out)[0]["top"][0]["class"] in CLASSES, err
    for c in CLASSES:  # and evaluated as published weights are (`--model ... --pretrained hf-hub:...`)
        (tmp_path / "val" / c).mkdir(parents=True)
        _photo().save(tmp_path / "val" / c / "0.jpg")
    code, out, err = run_main(capsys, "eval", "--model", "convnextv2_atto", "--pretrained", "hf-hub:me/pets-timm",
                              "--data", tmp_path / "val", "--json", "--output", tmp_path / "e")
    assert code == 0 and json.loads(out)["count"] == 3, err
    code, _, err = run_main(capsys, "predict", photo, "--checkpoint", "hf-hub:me/unknown")
    assert code == 2 and "not in the local Hugging Face cache" in err and "hf download me/unknown" in err
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in err


def test_transformers_imagenet_names_become_the_imagenet_synsets():
    from convnext.data.imagenet import _read, synsets_of_names

    rows = _read("imagenet-1k")
    names = list(rows.values())  # "tench, Tinca tinca", as transformers' id2label names them
    assert synsets_of_names(names) == list(rows)
    assert synsets_of_names([n.split(",")[0] for n in names]) == list(rows)
    assert synsets_of_names(names[:999] + ["teddy"]) is None and synsets_of_names(["a", "b"]) is None


def test_push_uploads_the_folder_through_the_hub_api(tmp_path, capsys, monkeypatch):
    import base64

    import huggingface_hub
    import httpx2 as httpx  # huggingface_hub's HTTP client: the only layer replaced

    model, ckpt = _checkpoint(tmp_path, "convnext_atto", Preprocess(input_size=64))
    run_main(capsys, "export", "--format", "hub", "--checkpoint", ckpt, "--output", tmp_path / "hub")
    sent, calls = {}, []

    def hub(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls.append((request.method, path))
        if path == "/api/repos/create":
            assert json.loads(request.content)["name"] == "pets" and request.headers["authorization"] == "Bearer hf_x"
            return httpx.Response(200, json={"url": "https://hub.test/me/pets"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/preupload/main"):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in files]})
        if path.endswith("/commit/main"):
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    sent[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return httpx.Response(200, json={"commitOid": "a" * 40, "commitUrl": "https://hub.test/me/pets/commit/a"})
        return httpx.Response(404, json={"error": f"not faked: {path}"})

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.test")
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
    try:
        code, out, err = run_main(capsys, "push", tmp_path / "hub", "me/pets")
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
    assert code == 0 and "https://hub.test/me/pets/commit/a" in out, err
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]
    assert all(sent[f] == (tmp_path / "hub" / f).read_bytes() for f in sent)  # the folder's bytes, whole
    code, _, err = run_main(capsys, "push", tmp_path, "me/pets")
    assert code == 2 and "not a model folder" in err


def test_each_layout_is_written_in_the_container_its_owners_load(tmp_path, capsys):
    import timm
    import torchvision

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_parity import _OfficialConvNeXt  # the official model definition, transcribed there

    model = perturb(convnext.create_model("convnext_tiny", num_classes=5)).eval()
    src = tmp_path / "ours.safetensors"
    save_checkpoint(model, src, classes=list("abcde"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    for to, dst in (("official", "o.pth"), ("torchvision", "tv.pth"), ("timm", "t.pth"), ("timm", "t.safetensors"),
                    ("hf", "hf")):
        code, _, err = run_main(capsys, "convert", src, tmp_path / dst, "--to", to)
        assert code == 0, (to, err)
    official = _OfficialConvNeXt(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768], num_classes=5, v2=False).eval()
    official.load_state_dict(torch.load(tmp_path / "o.pth", weights_only=True)["model"])  # main.py's way
    tv = torchvision.models.convnext_tiny(num_classes=5).eval()
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True))  # a bare state dict
    tm = timm.create_model("convnext_tiny", num_classes=5).eval()
    timm.models.load_checkpoint(tm, str(tmp_path / "t.pth"))  # timm's loader, {"state_dict": ...}
    tm2 = timm.create_model("convnext_tiny", num_classes=5, pretrained=True,
                            pretrained_cfg_overlay={"file": str(tmp_path / "t.safetensors"), "num_classes": 5}).eval()
    from transformers import AutoModelForImageClassification

    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        for who, out in (("official", official(x)), ("torchvision", tv(x)), ("timm .pth", tm(x)),
                         ("timm .safetensors", tm2(x)), ("transformers", hf(pixel_values=x).logits)):
            assert (out - ref).abs().max() <= 1e-4, who
    for f in ("o.pth", "t.pth", "t.safetensors", "hf"):  # and ours reads each back, classes and all
        assert load_for_inference(tmp_path / f)[1].classes == list("abcde"), f
    code, _, err = run_main(capsys, "convert", src, tmp_path / "x.onnx", "--to", "official")
    assert code == 2 and "should end in .pt or .pth or .safetensors" in err
