"""Deployment: exported ONNX / TorchScript / torch.export programs give eager PyTorch's logits."""

import json

import pytest
import torch

import convnext
from convnext.eval.predict import InferenceInfo, load_for_inference, predict
from convnext.preprocess import Preprocess
from convnext.export import ExportedModel, export_model, read_export_metadata
from convnext.models import ConvNeXt, ConvNeXtConfig
from convnext.weights import save_checkpoint

from helpers import perturb, run_cli

# Small V1 and V2 models (real blocks, 4 stages, few of them) keep exports fast.
CONFIGS = {
    "v1": ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=7),
    "v2": ConvNeXtConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), num_classes=7, use_grn=True,
                         ls_init_value=None),
}
BACKEND = {"onnx": "onnxruntime", "torchscript": "torchscript", "torch-export": "torch-export", "openvino": "openvino"}
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "torch-export": ".pt2", "openvino": ".xml"}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "torch-export", "openvino"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_exported_logits_match_eager_at_two_batch_and_image_sizes(fmt, version, tmp_path):
    if fmt in ("onnx", "openvino"):
        pytest.importorskip(BACKEND[fmt], reason="deployment extra: pip install -e '.[test]'")
    model = perturb(ConvNeXt(CONFIGS[version]))
    info = InferenceInfo(model_name=f"test_{version}", classes=list("abcdefg"), preprocess=Preprocess(
        input_size=64, crop_pct=0.9, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7)))
    path = export_model(model, info, tmp_path / f"m{SUFFIX[fmt]}", fmt)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    runner = ExportedModel(path, BACKEND[fmt])
    assert runner.info == info  # preprocessing travels inside the file
    for batch, size in [(1, 64), (3, 96)]:  # neither is the export example's batch of 2
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model(x)
        got = runner(x)
        assert got.shape == (batch, 7)
        assert (got - want).abs().max().item() <= 1e-4


def test_export_errors_are_clear(tmp_path):
    model, info = ConvNeXt(CONFIGS["v1"]), InferenceInfo("m", list("abcdefg"))
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model, info, tmp_path / "m.x", "tflite")
    with pytest.raises(ValueError, match=r"\.pt2"):
        export_model(model, info, tmp_path / "m.pt", "torch-export")
    path = export_model(model, info, tmp_path / "m.pt", "torchscript", dynamic_size=False)
    with pytest.raises(ValueError, match="torchscript export; backend onnxruntime needs a onnx"):
        ExportedModel(path, "onnxruntime")
    (tmp_path / "plain.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript or torch.export archive"):
        read_export_metadata(tmp_path / "plain.pt")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_cli_export_then_predict_with_an_exported_runtime(fmt, tmp_path, capsys):
    pytest.importorskip(BACKEND[fmt], reason="deployment extra: pip install -e '.[test]'")
    from PIL import Image

    model = perturb(convnext.create_model("convnext_atto", num_classes=3))
    classes = ["cat", "dog", "fox"]
    ckpt = tmp_path / "best.safetensors"
    save_checkpoint(model, ckpt, extra_metadata={"classes": json.dumps(classes), "preprocess": json.dumps(
        {"input_size": 64, "crop_pct": 1.0, "interpolation": "bilinear"})})
    for i in range(3):
        Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(tmp_path / f"img{i}.png")

    def cli(*args):
        r = run_cli(capsys, *args)
        assert r.returncode == 0, r.stderr
        return r.stdout

    exported = tmp_path / f"m{SUFFIX[fmt]}"
    out = cli("export", "--checkpoint", ckpt, "--format", fmt, "--output", exported)
    assert "dynamic batch and image size" in out
    images = [tmp_path / f"img{i}.png" for i in range(3)]
    via_ort = json.loads(cli("predict", *images, "--checkpoint", exported, "--backend", BACKEND[fmt], "--json"))
    via_torch = predict(*load_for_inference(ckpt), images)  # what `convnext predict` does without a backend
    assert [r["path"] for r in via_ort] == [str(p) for p in images]
    for a, b in zip(via_ort, via_torch, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert all(abs(ta["probability"] - tb["probability"]) <= 1e-4
                   for ta, tb in zip(a["top"], b["top"], strict=True))
    with pytest.raises(ValueError, match="convnext export"):  # a checkpoint is not an exported program
        ExportedModel(ckpt, BACKEND[fmt])
    # the optimized torch path (default) and a bf16 model give the same classes
    for extra in ([], ["--precision", "bf16"], ["--no-optimize"]):
        via = json.loads(cli("predict", *images, "--checkpoint", ckpt, "--json", *extra))
        assert [r["top"][0]["class"] for r in via] == [r["top"][0]["class"] for r in via_torch]


@pytest.mark.parametrize("fmt", ["torchscript", "torch-export"])
def test_cli_predict_with_the_torchscript_and_torch_export_backends(fmt, tmp_path, capsys):
    from PIL import Image

    from helpers import run_main

    model = perturb(convnext.create_model("convnext_atto", num_classes=3))
    ckpt = tmp_path / "best.safetensors"
    save_checkpoint(model, ckpt, classes=["cat", "dog", "fox"], preprocess={"input_size": 64, "crop_pct": 1.0})
    images = []
    for i in range(2):
        images.append(tmp_path / f"img{i}.png")
        Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(images[-1])
    exported = tmp_path / f"m{SUFFIX[fmt]}"
    assert run_main(capsys, "export", "--checkpoint", ckpt, "--format", fmt, "--output", exported)[0] == 0
    code, out, err = run_main(capsys, "predict", *images, "--checkpoint", exported, "--backend", BACKEND[fmt], "--json")
    assert code == 0, err
    via = json.loads(out)
    want = predict(*load_for_inference(ckpt), images)
    for a, b in zip(via, want, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert all(abs(ta["probability"] - tb["probability"]) <= 1e-4
                   for ta, tb in zip(a["top"], b["top"], strict=True))
