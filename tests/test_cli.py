"""The `convnext` command as a user runs it: its exit code and its words (its main() in this process, as
`helpers.run_cli` gives them; `python -m convnext` as a real process is run by test_train.py)."""

import pytest
import torch

import convnext
from convnext.weights import from_ours

from helpers import perturb, run_cli


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr  # argparse's own usage errors too
    for n in needles:
        assert n in r.stderr, r.stderr


def test_list_prints_params_macs_and_tags(capsys):
    r = run_cli(capsys, "list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:-1]}
    assert r.stdout.splitlines()[-1].startswith("* at 224x224")
    assert set(convnext.list_models()) == set(rows)
    assert "28.59" in rows["convnext_tiny"] and "4.46" in rows["convnext_tiny"]
    assert "fb_in22k_ft_in1k_384" in rows["convnext_tiny"] and "tv_in1k" in rows["convnext_tiny"]
    r = run_cli(capsys, "list", "convnextv2_*")
    assert r.returncode == 0 and all(line.startswith("convnextv2_") for line in r.stdout.splitlines()[1:-1])


def test_info(capsys):
    r = run_cli(capsys, "info", "convnextv2_huge")
    assert r.returncode == 0, r.stderr
    assert "660,289,640 parameters" in r.stdout and "fcmae_ft_in22k_in1k_512" in r.stdout
    assert "cc-by-nc-4.0" in r.stdout


@pytest.mark.parametrize("args,needles", [
    (("info", "convnext_tinny"), ("unknown model 'convnext_tinny'", "did you mean convnext_tiny")),
    (("list", "resnet"), ("no model matches",)),
    (("convert", "missing.pth", "out.safetensors"), ("checkpoint not found: missing.pth",)),
    (("frobnicate",), ("invalid choice",)),
])
def test_errors_are_one_line_exit_2(args, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli(capsys, *args), *needles)


def test_convert_torchvision_and_official_to_safetensors(tmp_path, capsys):
    import torchvision

    tv = perturb(torchvision.models.convnext_tiny(num_classes=3))
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    r = run_cli(capsys, "convert", tmp_path / "tv.pth", tmp_path / "tv.safetensors")
    assert r.returncode == 0, r.stderr
    assert "torchvision" in r.stdout and "convnext_tiny" in r.stdout
    m = convnext.create_model("convnext_tiny", pretrained=tmp_path / "tv.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (m(x) - tv(x)).abs().max() <= 1e-4

    # Official training checkpoint, EMA weights picked with --key, written back in official layout.
    src = perturb(convnext.create_model("convnextv2_atto", num_classes=2))
    torch.save({"model": {}, "model_ema": from_ours(src.state_dict(), "official")}, tmp_path / "ckpt.pth")
    r = run_cli(capsys, "convert", tmp_path / "ckpt.pth", tmp_path / "o.safetensors", "--key", "model_ema", "--to",
                "official")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    back = load_file(tmp_path / "o.safetensors")
    assert torch.equal(back["stages.0.0.grn.gamma"].flatten(), src.stages[0].blocks[0].grn.gamma)


def test_convert_garbage_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"garbage" * 100)
    assert_one_line_error(run_cli(capsys, "convert", tmp_path / "bad.pth", tmp_path / "o.safetensors"), "bad.pth")
