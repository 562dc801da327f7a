"""Trust: never load wrong weights silently, never overwrite a user's file, one clear line for every mistake.

Each test is named after what it protects; points 1, 2 and 8 of the trust issue are in test_weights.py.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import convnext

from helpers import run_cli
from test_train import FAST, fmnist, train, train_cmd  # noqa: F401  (fmnist is a fixture)

pytestmark = pytest.mark.timeout(600)


def one_line_error(r, needle, code=2):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def ema_run(fmnist, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ema") / "run"
    train(fmnist, out, epochs=1, model_ema=True, model_ema_decay=0.5)
    return out


# --- 3. --key on our own training state -----------------------------------------------------------

def test_eval_and_predict_use_the_ema_weights_of_our_last_pt(fmnist, ema_run, capsys):  # noqa: F811
    history = [json.loads(x) for x in (ema_run / "metrics.jsonl").read_text().splitlines()]
    r = run_cli(capsys, "eval", "--checkpoint", ema_run / "last.pt", "--data", fmnist, "--key", "model_ema", "--json",
                "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acc1"] == pytest.approx(history[-1]["val_acc1_ema"], abs=1e-6)
    # the plain weights
    r = run_cli(capsys, "eval", "--checkpoint", ema_run / "last.pt", "--data", fmnist, "--json", "--force")
    assert json.loads(r.stdout)["acc1"] == pytest.approx(history[-1]["val_acc1"], abs=1e-6)
    # the EMA weights are not the model's (else an ignored --key would pass), and predict gives the EMA's output
    state = torch.load(ema_run / "last.pt", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in state["model_ema"].items() if k != "n_averaged"}
    assert any(not torch.equal(v, ema[k]) for k, v in state["model"].items())
    from convnext.data import load_rgb
    from convnext.factory import load_for_inference

    images = sorted((fmnist / "val" / "Bag").glob("*.png"))[:4]
    r = run_cli(capsys, "predict", *images, "--checkpoint", ema_run / "last.pt", "--key", "model_ema", "--topk", "10",
                "--json", "--no-optimize")
    assert r.returncode == 0, r.stderr
    got = [{t["class"]: t["probability"] for t in p["top"]} for p in json.loads(r.stdout)]
    for key, expect_equal in (("model_ema", True), (None, False)):
        model, info = load_for_inference(ema_run / "last.pt", key=key)
        with torch.no_grad():
            probs = model(torch.stack([info.transform()(load_rgb(p)) for p in images])).softmax(1)
        close = all(abs(row[c] - float(probs[i, info.classes.index(c)])) < 1e-5 for i, row in enumerate(got)
                    for c in row)
        assert close == expect_equal, key


def test_an_unknown_key_is_an_error_that_lists_the_keys(fmnist, ema_run, capsys):  # noqa: F811
    r = run_cli(capsys, "eval", "--checkpoint", ema_run / "last.pt", "--data", fmnist, "--key", "model_emma")
    one_line_error(r, "no state dict under --key 'model_emma'")
    assert "the file has: model, model_ema" in r.stderr
    r = run_cli(capsys, "eval", "--checkpoint", ema_run / "best.safetensors", "--data", fmnist, "--key", "model_ema")
    one_line_error(r, "holds a single state dict")


# --- 4. and 10. --topk ----------------------------------------------------------------------------

@pytest.mark.parametrize("topk,needle", [("0", "--topk must be >= 1, got 0"), ("-1", "--topk must be >= 1, got -1"),
                                         ("11", "--topk must be between 1 and 10")])
def test_topk_outside_1_to_the_class_count_is_one_line(fmnist, ema_run, topk, needle, capsys):  # noqa: F811
    image = next((fmnist / "val" / "Bag").glob("*.png"))
    one_line_error(run_cli(capsys, "predict", image, "--checkpoint", ema_run / "best.safetensors", "--topk", topk),
                   needle)


# --- 5. export never writes over its input --------------------------------------------------------

def test_export_without_output_keeps_the_training_checkpoint(ema_run, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "last.pt"
    shutil.copy(ema_run / "last.pt", ckpt)
    before = ckpt.read_bytes()
    r = run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript")
    assert r.returncode == 0, r.stderr
    assert ckpt.read_bytes() == before  # the training state is intact
    assert (tmp_path / "last.torchscript.pt").is_file()
    one_line_error(run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript"), "exists; pass --force")
    assert run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript", "--force").returncode == 0
    one_line_error(run_cli(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript", "--output", ckpt),
                   "is the input")
    assert ckpt.read_bytes() == before


# --- 6. convert: no overwriting, never its input, honest suffixes ----------------------------------

def test_convert_refuses_existing_output_its_input_and_a_wrong_suffix(tmp_path, capsys):
    src = tmp_path / "w.pth"
    torch.save(convnext.create_model("convnext_atto").state_dict(), src)
    before = src.read_bytes()
    one_line_error(run_cli(capsys, "convert", src, src), "is the input")
    one_line_error(run_cli(capsys, "convert", src, tmp_path / "x.onnx"), "should end in .pt or .pth or .safetensors")
    dst = tmp_path / "w.safetensors"
    assert run_cli(capsys, "convert", src, dst).returncode == 0
    one_line_error(run_cli(capsys, "convert", src, dst), "exists; pass --force")
    assert run_cli(capsys, "convert", src, dst, "--force").returncode == 0
    os.link(dst, tmp_path / "alias.safetensors")  # the same file under another name is still the input
    one_line_error(run_cli(capsys, "convert", dst, tmp_path / "alias.safetensors", "--force"), "is the input")
    assert src.read_bytes() == before


# --- 7. files we write are readable by the group, as plain open() would make them -------------------

@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_honour_the_umask(fmnist, tmp_path, umask, mode):  # noqa: F811
    code = (
        "import os, sys, torch, convnext\n"
        f"os.umask({umask})\n"
        "from convnext.train import ClassificationTask, TrainConfig, fit\n"
        "from convnext.export import export_checkpoint\n"
        "from convnext.factory import convert_checkpoint\n"
        "out = sys.argv[2]\n"
        f"fit(ClassificationTask(TrainConfig(**{FAST!r}, data=sys.argv[1], output=out, epochs=1)))\n"
        "export_checkpoint(out + '/best.safetensors', 'onnx')\n"
        "convert_checkpoint(out + '/last.pt', out + '/converted.safetensors')\n"
    )
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", code, str(fmnist), str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    files = ["last.pt", "best.safetensors", "config.yaml", "metrics.jsonl", "curves.png", "best.onnx",
             "converted.safetensors", *[f"checkpoints/{p.name}" for p in (out / "checkpoints").glob("*.pt")]]
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_downloads_honour_the_umask(tmp_path, monkeypatch):
    from convnext.utils import cache_dir
    from convnext.weights import download

    (tmp_path / "w.pth").write_bytes(b"weights")
    old = os.umask(0o022)
    try:
        path = download((tmp_path / "w.pth").as_uri(), progress=False)
    finally:
        os.umask(old)
    assert path.parent == cache_dir() and stat.S_IMODE(path.stat().st_mode) == 0o644


# --- 9. --epochs keeps the recipe's warm-up share ---------------------------------------------------

def test_epochs_flag_keeps_the_recipe_warmup_share(caplog):
    from convnext.cli import build_parser
    from convnext.train.config import from_args

    parse = build_parser().parse_args
    with caplog.at_level("INFO"):
        cfg = from_args(parse(["train", "--config", "in1k_convnext_tiny", "--epochs", "1", "--data", "x"]))
    assert cfg.epochs == 1 and cfg.warmup_epochs == pytest.approx(20 / 300)
    assert "keeping its warm-up share" in caplog.text
    cfg = from_args(parse(["train", "--config", "in1k_convnext_tiny", "--epochs", "100", "--data", "x"]))
    assert cfg.warmup_epochs == 20  # it fits: the recipe's warm-up as it is
    with pytest.raises(ValueError, match="--warmup-epochs must be"):  # explicitly given and not fitting: refused
        from_args(parse(["train", "--config", "in1k_convnext_tiny", "--epochs", "1", "--warmup-epochs", "5",
                         "--data", "x"]))


def test_smoke_testing_a_recipe_with_one_epoch_runs(fmnist, tmp_path, capsys):  # noqa: F811
    r = run_cli(capsys, "train", "--config", "in1k_convnext_tiny", "--epochs", "1", "--data", fmnist, "--output",
                tmp_path / "o", "--model", "convnext_atto", "--input-size", "32", "--batch-size", "32",
                "--workers", "0", "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "keeping its warm-up share" in r.stderr


# --- 10. mistakes found before any work, one line -------------------------------------------------------

def test_a_bad_resume_file_or_an_output_file_fails_up_front(fmnist, tmp_path, capsys):  # noqa: F811
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello world")
    r = run_cli(capsys, *train_cmd(fmnist, tmp_path / "o", epochs=1, resume=garbage))
    one_line_error(r, "not a PyTorch checkpoint or safetensors file")
    one_line_error(run_cli(capsys, *train_cmd(fmnist, tmp_path / "o", epochs=1, resume=tmp_path / "missing.pt")),
                   "--resume: checkpoint not found")
    one_line_error(run_cli(capsys, *train_cmd(fmnist, garbage, epochs=1)), "is a file; it must be a folder")


def test_a_new_run_never_overwrites_an_earlier_one(fmnist, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    train(fmnist, out, epochs=1)
    before = (out / "last.pt").read_bytes()
    one_line_error(run_cli(capsys, *train_cmd(fmnist, out, epochs=1)), "already holds a training run")
    assert (out / "last.pt").read_bytes() == before
    r = run_cli(capsys, *train_cmd(fmnist, out, epochs=1, seed=3, force=True))  # asked for: start over
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["config"]["seed"] == 3
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step-00000009.pt"]


# --- 11. inputs the model cannot take --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 3, 31, 31), (2, 3, 224), (1, 1, 64, 64)])
def test_input_too_small_or_of_wrong_rank_says_what_the_model_needs(shape):
    model = convnext.create_model("convnext_atto")
    with pytest.raises(ValueError, match=r"ConvNeXt needs inputs of shape \(N, 3, H, W\) with H, W >= 32, got "
                                         + __import__("re").escape(str(shape))):
        model(torch.randn(*shape))
    assert model(torch.randn(1, 3, 32, 33)).shape == (1, 1000)
    traced = torch.jit.trace(model.eval(), torch.randn(1, 3, 64, 64))  # no check inside traced graphs
    assert "needs inputs" not in traced.code


# --- 12. predict: keep going, report, exit 1 ---------------------------------------------------------------

def test_predict_reports_unreadable_files_and_exits_1(fmnist, ema_run, tmp_path, capsys):  # noqa: F811
    images = sorted((fmnist / "val" / "Bag").glob("*.png"))[:2]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    r = run_cli(capsys, "predict", *images, tmp_path / "broken.png", "--checkpoint", ema_run / "best.safetensors")
    assert r.returncode == 1
    assert r.stdout.count(": ") == 2 and "broken.png" not in r.stdout  # the readable ones are predicted
    assert "cannot read" in r.stderr and "broken.png" in r.stderr
    r = run_cli(capsys, "predict", *images, tmp_path / "broken.png", "--checkpoint", ema_run / "best.safetensors",
                "--json")
    assert r.returncode == 1 and sum("error" in x for x in json.loads(r.stdout)) == 1
    assert run_cli(capsys, "predict", *images, "--checkpoint", ema_run / "best.safetensors").returncode == 0


# --- 13. installed like a user installs it ----------------------------------------------------------------

def test_fashion_mnist_is_found_downloaded_and_verified(tmp_path, monkeypatch):
    import shutil

    import convnext.data.fashion_mnist as fm

    embedded = fm._CHECKOUT
    monkeypatch.setattr(fm, "_CHECKOUT", tmp_path / "no-checkout")  # as in an installed package
    monkeypatch.setenv("CONVNEXT_FASHION_MNIST_URL", embedded.as_uri() + "/")
    folder = fm.source_dir()  # downloaded (here: from a file:// URL) into the cache, each file verified
    assert folder == Path(os.environ["CONVNEXT_CACHE"]) / "fashion-mnist" and fm._complete(folder)
    shutil.rmtree(folder)
    bad = tmp_path / "mirror"
    shutil.copytree(embedded, bad)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    monkeypatch.setenv("CONVNEXT_FASHION_MNIST_URL", bad.as_uri())
    with pytest.raises(ValueError, match="does not match the published hash"):
        fm.source_dir()
    assert not (folder / "t10k-labels-idx1-ubyte.gz").exists()
    monkeypatch.setenv("CONVNEXT_FASHION_MNIST_URL", (tmp_path / "offline").as_uri())
    with pytest.raises(FileNotFoundError, match="set CONVNEXT_FASHION_MNIST to a folder"):
        fm.source_dir()
    monkeypatch.setenv("CONVNEXT_FASHION_MNIST", str(embedded))  # a local copy, named
    assert fm.source_dir() == embedded


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_another_directory(tmp_path):
    import sysconfig

    root = Path(__file__).resolve().parents[1]
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(dist), str(root)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The test venv's packages (torch, ...) without reinstalling them; its editable convnext is not seen
    # (a path listed in a .pth file has its own .pth files ignored).
    Path(site, "test_venv_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", *map(str, dist.glob("*.whl"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "CONVNEXT_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore",
           "CONVNEXT_FASHION_MNIST_URL": (root / "data" / "fashion-mnist").as_uri()}
    env.pop("CONVNEXT_FASHION_MNIST", None)
    where = subprocess.run([py, "-c", "import convnext; print(convnext.__file__)"], capture_output=True, text=True,
                           cwd=elsewhere, env=env).stdout
    assert where.startswith(site), where  # the installed copy, not the checkout
    r = subprocess.run([py, "-m", "convnext", "demo", "--epochs", "1", "--per-class", "20", "--output", "out"],
                       capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo result: convnext_atto reached" in r.stdout
    assert (elsewhere / "out" / "train" / "best.safetensors").is_file()
    r = subprocess.run([py, "-c", "from convnext.train.config import load_yaml; print(load_yaml('in1k_convnext_tiny')"
                        "['drop_path_rate'])"], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.stdout.strip() == "0.1", r.stderr
