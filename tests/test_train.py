"""Training end to end on a slice of the embedded Fashion-MNIST: it learns, and never loses progress."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import convnext
from convnext.data.fashion_mnist import prepare
from convnext.train import ClassificationTask, TrainConfig, fit
from convnext.weights import read_checkpoint

from helpers import run_cli

pytestmark = pytest.mark.timeout(600)

FAST = dict(model="convnext_atto", input_size=32, batch_size=32, lr=2e-3, warmup_epochs=0.5, aa="none",
            color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, crop_pct=1.0, scale=(0.6, 1.0),
            workers=0, threads=1, progress=False)


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    """A stratified slice: 30 training and 10 validation images per class."""
    return prepare(tmp_path_factory.mktemp("data") / "fm", per_class={"train": 30, "val": 10})


def _args(**kw):
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (tuple, list)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


def cli(*args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "convnext", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def train(data, output, **kw):
    """`fit` the classification task with the FAST settings (in this process)."""
    return fit(ClassificationTask(TrainConfig(**{**FAST, "data": str(data), "output": str(output), **kw})))


def train_cmd(data, output, **kw):
    return ["train", *_args(**{**FAST, "data": data, "output": output, **kw})]


def final_state(output):
    state, _ = read_checkpoint(output / "last.pt")
    return state


def assert_same_run(a, b):
    """Bitwise-equal weights, EMA, optimizer state and metrics (timings aside)."""
    for key in ("model", "model_ema"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for (i, sa), (j, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert i == j and all(torch.equal(sa[k], sb[k]) for k in sa), i
    strip = lambda h: [{k: v for k, v in e.items() if not k.startswith("train_time") and k != "train_img_s"} for e in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    assert a["step"] == b["step"]


def test_training_learns_and_eval_predict_agree(fmnist, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(fmnist, out, epochs=8, lr=3e-3)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 8
    assert {"epoch", "train_loss", "val_loss", "val_acc1", "val_acc5", "lr"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.3  # the loss falls
    assert summary["best"] >= 40.0  # chance is 10%
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.safetensors", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    torch.load(out / "last.pt", weights_only=True)  # full state, no allow-list needed

    # `convnext eval` on the saved best weights reproduces training's evaluation of that epoch.
    r = run_cli(capsys, "eval", "--checkpoint", out / "best.safetensors", "--data", fmnist, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["acc1"] == pytest.approx(summary["best"], abs=1e-6)
    assert res["count"] == 100 and len(res["per_class_acc"]) == 10 and res["classes"][0] == "Ankle_boot"
    assert (out / "confusion_matrix.png").is_file()
    r = run_cli(capsys, "eval", "--checkpoint", out / "last.pt", "--data", fmnist / "val", "--json", "--force")
    assert json.loads(r.stdout)["acc1"] == pytest.approx(history[-1]["val_acc1"], abs=1e-6)

    # `convnext predict` gives the class the model's logits give.
    images = sorted((fmnist / "val" / "Trouser").glob("*.png"))[:3]
    r = run_cli(capsys, "predict", "--checkpoint", out / "best.safetensors", *images, "--json", "--topk", "3")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    from convnext.eval import load_for_inference
    from convnext.data import load_rgb

    model, info = load_for_inference(out / "best.safetensors")
    with torch.no_grad():
        logits = model(torch.stack([info.transform()(load_rgb(p)) for p in images]))
    for p, row in zip(preds, logits, strict=True):
        assert len(p["top"]) == 3 and p["top"][0]["class"] == info.classes[int(row.argmax())]
        assert p["top"][0]["index"] == int(row.argmax()) and p["top"][0]["name"] == p["top"][0]["class"]
        assert sum(t["probability"] for t in p["top"]) <= 1.0 + 1e-6
    r = run_cli(capsys, "predict", "--checkpoint", out / "best.safetensors", images[0], "--csv")
    assert r.stdout.splitlines()[0] == "path,rank,index,class,name,probability,error" and len(r.stdout.splitlines()) == 6


def test_reproducible_whatever_the_workers(fmnist, tmp_path, capsys):
    kw = dict(epochs=2, model_ema=True, model_ema_decay=0.9, drop_path_rate=0.1, mixup=0.8, cutmix=1.0,
              aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    assert run_cli(capsys, *train_cmd(fmnist, tmp_path / "w0", workers=0, **kw)).returncode == 0
    r = run_cli(capsys, *train_cmd(fmnist, tmp_path / "w2", workers=2, **kw))
    assert r.returncode == 0, r.stderr
    a, b = final_state(tmp_path / "w0"), final_state(tmp_path / "w2")
    assert_same_run(a, b)
    assert "val_acc1_ema" in a["history"][-1]
    assert not torch.equal(a["model"]["stem.conv.weight"], a["model_ema"]["module.stem.conv.weight"])


def _wait_for(path_glob, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(path_glob()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the checkpoint appeared: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for a checkpoint")


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bitwise_identical(fmnist, tmp_path):
    kw = dict(epochs=3, save_every_steps=2, model_ema=True, model_ema_decay=0.9, drop_path=0.1, mixup=0.8,
              cutmix=1.0)
    ref = tmp_path / "ref"
    r = cli(*train_cmd(fmnist, ref, **kw))
    assert r.returncode == 0, r.stderr
    expected = final_state(ref)
    assert expected["step"] == 27  # 9 steps per epoch: checkpoints at odd steps fall mid-epoch

    # 1) SIGKILL mid-epoch, right after the step-4 checkpoint (epoch 1 has 9 steps).
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "convnext", *train_cmd(fmnist, out, **kw)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints").glob("step-00000004.pt"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a newer but partial checkpoint (a crash mid-copy) must be ignored
    (out / "checkpoints" / "step-00000099.pt").write_bytes(b"PK\x03\x04 truncated")
    r = cli(*train_cmd(fmnist, out, resume="auto", **kw))
    assert r.returncode == 0, r.stderr
    assert "skipping incomplete checkpoint" in r.stderr and "resumed from" in r.stderr
    assert_same_run(expected, final_state(out))

    # 2) SIGKILL in the middle of writing a checkpoint (the 5th save dies half-written).
    out = tmp_path / "died_writing"
    script = (
        "import os, signal, sys, torch\n"
        "real, count = torch.save, [0]\n"
        "def dying_save(obj, f, *a, **k):\n"
        "    count[0] += 1\n"
        "    if count[0] == 5:\n"
        "        open(f, 'wb').write(b'PK partial')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = dying_save\n"
        "from convnext.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, *map(str, train_cmd(fmnist, out, **kw))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL
    assert list((out / "checkpoints").glob(".step-*.tmp")), "the partial write should be left as a temp file"
    newest = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    torch.load(newest, weights_only=True)  # the newest visible checkpoint is complete
    r = cli(*train_cmd(fmnist, out, resume="auto", **kw))
    assert r.returncode == 0, r.stderr
    assert_same_run(expected, final_state(out))


def test_grad_accumulation_equals_the_big_batch(fmnist, tmp_path):
    a = train(fmnist, tmp_path / "a", epochs=1, batch_size=32)
    b = train(fmnist, tmp_path / "b", epochs=1, batch_size=16, grad_accum=2)
    assert a["step"] == b["step"] == 9
    sa, sb = final_state(tmp_path / "a")["model"], final_state(tmp_path / "b")["model"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=2e-5, rtol=1e-4)


def test_nan_policy(fmnist, tmp_path, capsys):
    r = run_cli(capsys, *train_cmd(fmnist, tmp_path / "abort", epochs=1, lr=1e12, save_every_steps=1))
    assert r.returncode == 1, r.stderr
    err = [ln for ln in r.stderr.splitlines() if "error" in ln][-1]
    assert "non-finite loss" in err and ".png" in err and "no checkpoint written" in err
    written = sorted((tmp_path / "abort" / "checkpoints").glob("*.pt"))
    assert written  # (the first step's, before the loss went non-finite)
    for ck in written:
        state = torch.load(ck, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    r = run_cli(capsys, *train_cmd(fmnist, tmp_path / "skip", epochs=1, lr=1e12, nan_policy="skip"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()[-1])["nan_skipped"] > 0


def test_bad_images_are_skipped_and_reported(fmnist, tmp_path, capsys):
    import shutil

    from test_data import make_bad_folder

    data = tmp_path / "data"
    shutil.copytree(fmnist, data)
    bad = make_bad_folder(data / "train" / "Bag" / "odd")  # a nested folder of tricky files
    r = run_cli(capsys, *train_cmd(data, tmp_path / "run", epochs=1, batch_size=16))
    assert r.returncode == 0, r.stderr
    for name in ("truncated.jpg", "empty.png", "text.jpg"):
        assert f"skipping unreadable image {bad / name}" in r.stderr
    assert "cmyk" not in r.stderr and "rgba" not in r.stderr
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["bad_images"] == 3
    r = run_cli(capsys, *train_cmd(data, tmp_path / "strict", epochs=1, batch_size=16, bad_images="error"))
    assert r.returncode == 2 and "unreadable image" in r.stderr and "Traceback" not in r.stderr


def test_finetune_from_checkpoint_reinitialises_the_head(fmnist, tmp_path, monkeypatch, capsys):
    """--finetune loads the backbone (every tensor), re-initialises the head at --head-init-scale, and each
    option asked for acts: layer decay in the optimizer's groups, bf16 autocast, channels-last weights,
    gradient checkpointing in the model that trains."""
    from convnext.train import engine
    from convnext.train.optim import layer_id

    src = convnext.create_model("convnext_atto", num_classes=1000)
    torch.save({"model": convnext.weights.from_ours(src.state_dict(), "official")}, tmp_path / "in1k.pth")
    seen = {"precision": set()}
    wrap, autocast = engine.Trainer._wrap, engine.autocast
    monkeypatch.setattr(engine.Trainer, "_wrap", lambda self, m: seen.setdefault("model", m) and wrap(self, m))
    monkeypatch.setattr(engine, "autocast", lambda d, p: seen["precision"].add(p) or autocast(d, p))
    train(fmnist, tmp_path / "ft", epochs=1, finetune=str(tmp_path / "in1k.pth"), head_init_scale=0.001, lr=1e-12,
          layer_decay=0.7, precision="bf16", channels_last=True, grad_checkpointing=True)
    state = final_state(tmp_path / "ft")
    want = src.state_dict()
    for k, v in state["model"].items():
        if not k.startswith("head.fc"):
            torch.testing.assert_close(v, want[k], atol=1e-5, rtol=0)  # every backbone tensor (lr <= min_lr 1e-6)
    head = state["model"]["head.fc.weight"]
    assert head.shape == (10, 320) and 1e-6 < head.std() < 1e-4  # trunc_normal(.02) x 0.001 (1.0 gives ~.02)
    depths = src.cfg.depths
    scales = sorted({round(g["lr_scale"], 12) for g in state["optimizer"]["param_groups"]})
    n = layer_id("head.fc.weight", depths)[1]
    assert scales == sorted({round(0.7 ** (n + 1 - lid), 12) for lid in range(n + 2)})  # 0.7^(n+1) .. 1
    model = seen["model"]
    assert seen["precision"] == {"bf16"}
    assert model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last) and model.grad_checkpointing
    # The bf16 evaluation during training agrees with an fp32 evaluation of the same weights.
    line = json.loads((tmp_path / "ft" / "metrics.jsonl").read_text())
    r = run_cli(capsys, "eval", "--checkpoint", tmp_path / "ft" / "last.pt", "--data", fmnist, "--json")
    fp32 = json.loads(r.stdout)
    assert line["val_acc1"] == pytest.approx(fp32["acc1"], abs=3.0)  # at most 3 of 100 images flip
    assert line["val_loss"] == pytest.approx(fp32["loss"], rel=0.02)


@pytest.mark.parametrize("args,needle", [
    (("--model", "convnext_tinny"), "did you mean convnext_tiny"),
    (("--data", "/nonexistent/data"), "not found"),
    (("--lr", "-1"), "--lr must be a finite number > 0"),
    (("--lr", "nan"), "--lr must be a finite number > 0"),
    (("--warmup-epochs", "5", "--epochs", "5"), "--warmup-epochs must be"),
    (("--batch-size", "0"), "--batch-size must be >= 1"),
    (("--input-size", "16"), "--input-size must be >= 32"),
    (("--precision", "fp8"), "--precision must be one of"),
    (("--scale", "0.5", "x"), "scale: cannot use"),
    (("--config", "/nonexistent.yaml"), "config file not found"),
])
def test_cli_bad_input_is_one_line_exit_2(fmnist, tmp_path, args, needle, capsys):
    """In this process (the CLI's own main); the first case also as a real process, for its exit code."""
    from helpers import one_line, run_main

    base = {"--data": str(fmnist), "--output": str(tmp_path / "o"), "--epochs": "1", "--warmup-epochs": "0"}
    argv = ["train"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    code, _, err = run_main(capsys, *argv, *args)
    assert code == 2 and needle in one_line(err), err
    if "--model" in args:
        r = cli(*argv, *args)
        assert r.returncode == 2 and needle in one_line(r.stderr)


def test_yaml_recipes_parse(tmp_path):
    from convnext.train.config import list_recipes, load_yaml

    recipes = list_recipes()  # packaged with the library, read through importlib.resources
    assert len(recipes) >= 6 and "in1k_convnext_tiny" in recipes and "demo" in recipes
    from convnext.train.detection import DetectConfig
    from convnext.train.pretrain import PretrainConfig
    from convnext.train.segmentation import SegmentConfig

    # the other tasks' recipes
    config_of = {"demo_detect": DetectConfig, "demo_segment": SegmentConfig, "demo_fcmae_pretrain": PretrainConfig}
    for name in recipes:
        cls = config_of.get(name) or {"mask_rcnn": DetectConfig, "cascade_": DetectConfig, "upernet_": SegmentConfig}.get(
            next((p for p in ("mask_rcnn", "cascade_", "upernet_") if name.startswith(p)), ""), TrainConfig)
        cls(**{"data": "x", **load_yaml(name, cls)})
    assert load_yaml("in1k_convnext_tiny.yaml") == load_yaml("in1k_convnext_tiny")
    (tmp_path / "bad.yaml").write_text("lerning_rate: 3\n")
    with pytest.raises(ValueError, match="unknown option 'lerning_rate'"):
        load_yaml(tmp_path / "bad.yaml")


def test_resume_refuses_another_run(fmnist, tmp_path):
    train(fmnist, tmp_path / "r", epochs=1)
    with pytest.raises(ValueError, match="use another --output"):
        train(fmnist, tmp_path / "r", epochs=2, model="convnextv2_atto", resume="auto")


def test_demo_runs_train_eval_predict_end_to_end(fmnist, tmp_path, monkeypatch, capsys):
    """The main job's own code path (recipe, training, eval, predict, summary) on the small slice."""
    import convnext.data.fashion_mnist as fm
    from convnext.cli import main

    monkeypatch.setattr(fm, "prepare", lambda root, per_class=None: fmnist)
    assert main(["demo", "--output", str(tmp_path / "demo"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "== evaluate" in out and "== predict" in out and "demo result: convnext_atto reached" in out
    assert (tmp_path / "demo" / "train" / "confusion_matrix.png").stat().st_size > 0
    assert any(ln.endswith("%") and ".png: " in ln for ln in out.splitlines())  # a top-3 prediction line


@pytest.mark.slow
def test_long_bf16_cpu_runs_switch_on_the_compiled_depthwise_backward(fmnist, tmp_path, monkeypatch):
    """Only a long bf16 CPU run takes the compiled depthwise backward (a per-model setting: nothing process-wide
    is left switched on), and it trains as the aten kernels do, bf16 rounding apart."""
    from convnext.models import fast
    from convnext.train import engine

    calls = []
    apply = fast._DepthwiseConvFn.apply
    monkeypatch.setattr(fast._DepthwiseConvFn, "apply", lambda *a: calls.append(1) or apply(*a))
    train(fmnist, tmp_path / "short", epochs=1, precision="bf16", seed=3)
    assert calls == []  # a short run: not worth ~20 s of compiling
    monkeypatch.setattr(engine, "FUSED_DEPTHWISE_MIN_STEPS", 1)  # as if the run were long
    train(fmnist, tmp_path / "long", epochs=1, precision="bf16", seed=3)
    assert calls and fast._compiled_weight_grad[0] is not None
    a, b = (json.loads((tmp_path / d / "metrics.jsonl").read_text()) for d in ("short", "long"))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02)  # the same training, bf16 rounding apart
    model = convnext.create_model("convnext_atto")
    assert not any(m.fused_dw_backward for m in model.modules() if hasattr(m, "fused_dw_backward"))


def test_the_recipe_reaches_the_data_the_loss_and_the_optimizer(fmnist, tmp_path):
    """Each regularisation flag acts where it should (a run with them off sees other batches and another
    loss), and the optimizer is the recipe's: AdamW betas/eps, peak lr = lr_base x batch / 4096, the
    scheduled lr times each group's lr_scale, and the EMA's decay formula."""
    from convnext.data.transforms import RandAugment
    from convnext.train.schedule import lr_at
    from torchvision.transforms import v2

    def task(**kw):
        t = ClassificationTask(TrainConfig(**{**FAST, "data": str(fmnist), "output": str(tmp_path / "x"), **kw}))
        return t, t.datasets()[0]

    on, ds_on = task(aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.25, smoothing=0.1)
    off, ds_off = task(aa="none", mixup=0.0, cutmix=0.0, reprob=0.0, smoothing=0.0)
    ops = {type(op) for op in ds_on.transform.transforms}
    assert RandAugment in ops and v2.RandomErasing in ops and on.mix is not None
    assert on.criterion.label_smoothing == 0.1 and off.criterion.label_smoothing == 0.0
    assert not ({RandAugment, v2.RandomErasing} & {type(op) for op in ds_off.transform.transforms}) and off.mix is None
    batch_on = torch.stack([ds_on[(0, i)][0] for i in range(8)])
    batch_off = torch.stack([ds_off[(0, i)][0] for i in range(8)])
    assert not torch.equal(batch_on, batch_off)

    out = tmp_path / "run"
    cfg = dict(epochs=1, lr=None, lr_base=4e-3, batch_size=32, warmup_epochs=0.5, opt_betas=(0.8, 0.95), opt_eps=1e-7,
               layer_decay=0.8, model_ema=True, model_ema_decay=0.6, save_every_steps=1, keep_checkpoints=20)
    train(fmnist, out, **cfg)
    steps = sorted(out.glob("checkpoints/step-*.pt"))
    s1, s2, s3, last = (torch.load(p, weights_only=True) for p in (steps[0], steps[1], steps[2], steps[-1]))
    peak, total = 4e-3 * 32 / 4096, last["step"]
    for g in last["optimizer"]["param_groups"]:
        assert tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-7
    for s in (s2, s3):  # the lr each group took at that step: the schedule's, times its own scale
        want = lr_at(s["step"] - 1, base_lr=peak, min_lr=1e-6, warmup_steps=round(0.5 * total), total_steps=total)
        scales = {round(g["lr"] / want, 9) for g in s["optimizer"]["param_groups"]}
        assert scales == {round(g["lr_scale"], 9) for g in s["optimizer"]["param_groups"]} and len(scales) > 3
    w1, w2 = s1["model"], s2["model"]
    ema = {k.removeprefix("module."): v for k, v in s2["model_ema"].items() if k != "n_averaged"}
    k = "stages.2.blocks.3.pwconv1.weight"
    # EMA: the first update copies the weights, then decay x previous + (1 - decay) x new
    torch.testing.assert_close(ema[k], 0.6 * w1[k] + 0.4 * w2[k])
    assert not torch.allclose(ema[k], w2[k])


def _mmcv_poly(step, total, base, min_lr, power=1.0):  # mmcv/runner/hooks/lr_updater.py PolyLrUpdaterHook.get_lr
    coeff = (1 - step / total) ** power
    return (base - min_lr) * coeff + min_lr


def _mmcv_step(epoch, base, step, gamma=0.1):  # StepLrUpdaterHook.get_lr (by_epoch, a list of steps)
    exp = len(step)
    for i, s in enumerate(step):
        if epoch < s:
            exp = i
            break
    return base * gamma**exp


def _mmcv_warmup(cur_iters, regular, warmup_iters, ratio):  # LrUpdaterHook.get_warmup_lr, warmup="linear"
    k = (1 - cur_iters / warmup_iters) * (1 - ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("schedule", ["poly", "step"])
def test_the_det_seg_schedules_are_mmcvs(fmnist, tmp_path, schedule):
    """--schedule poly|step with --warmup-iters/--warmup-ratio: the lr of every logged step is mmcv's."""
    from convnext.train.schedule import mmcv_lr_at

    kw = dict(schedule=schedule, warmup_iters=5, warmup_ratio=1e-3, min_lr=0.0, epochs=3, lr=1e-3)
    if schedule == "step":
        kw["lr_steps"] = (1, 2)
    summary = train(fmnist, tmp_path / "run", **kw)
    history = summary["history"] if "history" in summary else [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = history[0]["step"]
    total = per_epoch * 3
    for line in history:
        step = line["step"] - 1  # the epoch's last optimizer step
        regular = (_mmcv_poly(step, total, 1e-3, 0.0) if schedule == "poly"
                   else _mmcv_step(step // per_epoch, 1e-3, [1, 2]))
        want = _mmcv_warmup(step, regular, 5, 1e-3) if step < 5 else regular
        assert line["lr"] == pytest.approx(want, rel=1e-9)
    for step in range(total):  # and every step in between, warm-up included
        regular = (_mmcv_poly(step, total, 1e-3, 0.0) if schedule == "poly"
                   else _mmcv_step(step // per_epoch, 1e-3, [1, 2]))
        want = _mmcv_warmup(step, regular, 5, 1e-3) if step < 5 else regular
        got = mmcv_lr_at(step, schedule=schedule, base_lr=1e-3, min_lr=0.0, warmup_steps=5, total_steps=total,
                         warmup_ratio=1e-3, steps_per_epoch=per_epoch, milestones=(1, 2))
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("flags, needle", [
    (("--schedule", "step"), "--schedule step needs --lr-steps"),
    (("--schedule", "step", "--lr-steps", "5"), "--schedule step needs --lr-steps"),
    (("--lr-steps", "1"), "--lr-steps are the milestones of --schedule step"),
    (("--warmup-ratio", "0.1"), "--warmup-ratio is for the poly and step schedules"),
    (("--schedule", "linear"), "schedule"),
])
def test_schedule_flags_that_do_not_fit_are_one_line(fmnist, tmp_path, flags, needle, capsys):
    r = run_cli(capsys, "train", "--data", fmnist, "--output", tmp_path / "r", "--model", "convnext_atto",
                "--epochs", 3, *flags)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
