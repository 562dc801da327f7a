"""The engine is task-generic: a task defined here (regression on random data, two named losses, dropout)
gets bitwise kill-and-resume, gradient accumulation and DDP on 2 CPU processes with no code of its own
for them. Also runnable as a script (`python tests/test_engine.py OUT [key=value ...]`), which is how
the kill-and-resume and torchrun tests start it.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from helpers import assert_same_run, sigkill_when

from convnext.data import Batch
from convnext.tasks import TaskSpec, opt, register
from convnext.train import EngineConfig, Task, fit

pytestmark = pytest.mark.timeout(600)


class RandomRegression(Dataset):
    """y = <w, x> + noise, fixed by `seed`; training samples get seeded input noise from (epoch, index)."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.linspace(-1, 1, 8) + 0.1 * torch.randn(n, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        x = self.x[i]
        if self.augment:
            x = x + 0.05 * torch.randn(8, generator=torch.Generator().manual_seed(epoch * 100_003 + i))
        return x, self.y[i], i


class RegressionTask(Task):
    name = "regress"
    best_metric = "val_mse"
    higher_is_better = False
    loss_names = ("mse", "l1")

    def __init__(self, cfg: EngineConfig, dropout: float = 0.1, step_delay: float = 0.0) -> None:
        super().__init__(cfg)
        self.dropout = dropout  # random per rank: off where 2 processes must equal 1
        self.step_delay = step_delay  # slows steps down so that a test can kill the run mid-way

    def datasets(self):
        return RandomRegression(96, seed=1, augment=True), RandomRegression(40, seed=2, augment=False)

    def collate(self, items):
        x, y, idx = zip(*items, strict=True)
        return Batch(torch.stack(x), torch.stack(y), list(idx), [])

    def build_model(self):
        return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(32, 1))

    def loss(self, model, batch, device):
        time.sleep(self.step_delay)
        pred = model(batch.inputs.to(device)).squeeze(1)
        return {"mse": F.mse_loss(pred, batch.targets), "l1": 0.1 * F.l1_loss(pred, batch.targets)}

    def evaluate(self, model, loader, device, *, progress, lockstep):
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in loader:
                sums += torch.tensor([F.mse_loss(model(batch.inputs).squeeze(1), batch.targets, reduction="sum"),
                                      len(batch)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(sums)
        return {"val_mse": float(sums[0] / sums[1]), "val_count": int(sums[1])}


def load_regressor(checkpoint, key=None):
    """The task's model from any file of its runs: the one reader, the header's task and spec."""
    from convnext.weights import read_model_file

    file = read_model_file(checkpoint)
    assert (file.task, file.spec) == ("regress", {"model_name": "mlp"})
    model = RegressionTask(None).build_model()
    model.load_state_dict(file.state_dict(key))
    return model.eval(), file.spec


def evaluate_regressor(checkpoint, data, *, batch_size, workers, precision, progress, key=None):
    from torch.utils.data import DataLoader

    model, _ = load_regressor(checkpoint, key)
    task = RegressionTask(None)
    loader = DataLoader(task.datasets()[1], batch_size=batch_size, collate_fn=task.collate)
    return task.evaluate(model, loader, torch.device("cpu"), progress=progress, lockstep=False)


# The whole of what a new task adds to reach the CLI: one registration (its module; no line in cli.py)
SPEC = register(TaskSpec(name="regress", help="regression on random data (the engine test's task)",
                         config=EngineConfig, task=RegressionTask, load=load_regressor, evaluate=evaluate_regressor,
                         eval_options=(opt("--key"),)))


def config(output, **kw):
    return EngineConfig(**{"model": "mlp", "data": "(random)", "output": str(output), "epochs": 3, "batch_size": 16,
                           "lr": 1e-2, "warmup_epochs": 1, "weight_decay": 0.01, "workers": 0, "threads": 1,
                           "progress": False, "log_every": 1, **kw})


def run_script(output, *args, nproc=1, **kw):
    """This file as a script, in 1 process or under torchrun with `nproc`."""
    settings = [f"{k}={v}" for k, v in kw.items()]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return [sys.executable, *launcher, __file__, str(output), *settings, *args], env


def state(output):
    return torch.load(Path(output) / "last.pt", weights_only=True)


def test_a_new_task_trains_with_named_losses_best_metric_and_logs(tmp_path):
    summary = fit(RegressionTask(config(tmp_path / "run", epochs=6)))
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert {"train_loss", "train_mse", "train_l1", "val_mse", "val_count", "lr", "step"} <= set(history[0])
    for h in history:  # the optimised total is the sum of the named losses
        assert h["train_loss"] == pytest.approx(h["train_mse"] + h["train_l1"], rel=1e-6)  # fp32 sum
    assert history[-1]["val_mse"] < 0.5 * history[0]["val_mse"]  # it learns
    assert history[0]["val_count"] == 40
    assert summary["best_metric"] == "val_mse" and summary["best"] == min(h["val_mse"] for h in history)
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "curves.png").is_file()


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    fit(RegressionTask(config(tmp_path / "big", epochs=1, warmup_epochs=0.5, batch_size=32), dropout=0))
    fit(RegressionTask(config(tmp_path / "acc", epochs=1, warmup_epochs=0.5, batch_size=16, grad_accum=2), dropout=0))
    a, b = state(tmp_path / "big"), state(tmp_path / "acc")
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)


def test_a_registered_task_trains_and_evaluates_through_the_cli(tmp_path, capsys):
    """`convnext regress train|eval` exist because the task registered itself: cli.py names no task."""
    from convnext.cli import main

    assert "regress" not in Path(__file__).parents[1].joinpath("src/convnext/cli.py").read_text()
    out = tmp_path / "run"
    assert main(["regress", "train", "--model", "mlp", "--data", "(random)", "--output", str(out), "--epochs", "3",
                 "--batch-size", "16",
                 "--lr", "1e-2", "--warmup-epochs", "1", "--workers", "0", "--threads", "1", "--no-progress"]) == 0
    done = capsys.readouterr().out
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = min(h["val_mse"] for h in history)
    assert f"done: mlp epoch 3  best val_mse {best}" in done
    for name in ("best.safetensors", "last.pt"):  # one header on every file the run wrote
        assert main(["regress", "eval", "--checkpoint", str(out / name), "--data", "(random)", "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        want = best if name == "best.safetensors" else history[-1]["val_mse"]
        assert res["val_count"] == 40 and res["val_mse"] == pytest.approx(want, rel=1e-6)
    # another task's command refuses this task's file, naming the command for it
    (tmp_path / "images").mkdir()
    assert main(["eval", "--checkpoint", str(out / "best.safetensors"), "--data", str(tmp_path / "images")]) == 2
    assert "holds a regress model" in capsys.readouterr().err


def test_fit_leaves_no_process_wide_state_changed(tmp_path, monkeypatch):
    """Torch threads and the library's log level (quietened on ranks other than 0) come back after fit,
    also when it fails."""
    import logging

    from convnext.train import distributed as D
    from convnext.train import engine

    class NotMain(D.DistEnv):  # as a rank other than 0 sees it: its log is quietened
        is_main = property(lambda self: False)

    monkeypatch.setattr(engine.D, "setup", lambda device: NotMain())
    log = logging.getLogger("convnext")
    saved = torch.get_num_threads(), log.level
    torch.set_num_threads(2)
    log.setLevel(logging.INFO)
    before = 2, logging.INFO
    seen = []
    monkeypatch.setattr(RegressionTask, "evaluate", lambda self, *a, **k: seen.append(log.level) or {"val_mse": 1.0})
    fit(RegressionTask(config(tmp_path / "ok", epochs=1, warmup_epochs=0, threads=1)))
    assert seen == [logging.WARNING]  # while it ran: quiet (and at 1 thread)
    assert (torch.get_num_threads(), log.level) == before
    with pytest.raises(TypeError, match="loss_names declare"):  # fails at its first step
        bad = RegressionTask(config(tmp_path / "bad", epochs=1, warmup_epochs=0, threads=1))
        bad.loss_names = ("mse",)
        fit(bad)
    assert (torch.get_num_threads(), log.level) == before
    torch.set_num_threads(saved[0])
    log.setLevel(saved[1])


def test_the_engine_sums_the_named_losses_and_guards_the_name_of_the_sum(tmp_path):
    """One loss of any name (no KeyError), and no task loss may be called `loss` (the sum's name)."""
    class One(RegressionTask):
        loss_names = ("mse",)

        def loss(self, model, batch, device):
            return {"mse": super().loss(model, batch, device)["mse"]}

    history = fit(One(config(tmp_path / "one", epochs=1, warmup_epochs=0)))
    assert "train_mse" not in history and history["train_loss"] > 0

    class Shadow(RegressionTask):
        loss_names = ("loss", "l1")

        def loss(self, model, batch, device):
            out = super().loss(model, batch, device)
            return {"loss": out["mse"], "l1": out["l1"]}

    with pytest.raises(TypeError, match="names the sum"):
        fit(Shadow(config(tmp_path / "shadow", epochs=1, warmup_epochs=0)))


def test_resuming_mid_run_with_gradient_accumulation_is_bitwise(tmp_path):
    """--grad-accum 2: a run resumed from one of its mid-epoch step files ends with the uninterrupted run's
    weights, optimizer state and metrics, bit for bit (SIGKILL itself: test_sigkill_then_resume_...)."""
    ref = tmp_path / "ref"
    fit(RegressionTask(config(ref, grad_accum=2, batch_size=8, save_every_steps=1, keep_checkpoints=99)))
    mid = ref / "checkpoints" / "step-00000008.pt"  # 6 optimizer steps an epoch: epoch 2, mid-way
    assert torch.load(mid, weights_only=True)["progress"]["batch"] > 0
    fit(RegressionTask(config(tmp_path / "resumed", grad_accum=2, batch_size=8, save_every_steps=1,
                              resume=str(mid))))
    assert_same_run(state(ref), state(tmp_path / "resumed"))


def test_clip_grad_bounds_the_global_gradient_norm_of_every_step(tmp_path, monkeypatch):
    norms = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    fit(RegressionTask(config(tmp_path / "free", epochs=1, warmup_epochs=0)))
    free = list(norms)
    norms.clear()
    fit(RegressionTask(config(tmp_path / "clipped", epochs=1, warmup_epochs=0, clip_grad=0.05)))
    assert max(free) > 0.5 and max(norms) <= 0.05 * (1 + 1e-5) and len(norms) == len(free)


@pytest.mark.slow
def test_a_compiled_run_equals_the_eager_run(tmp_path, monkeypatch):
    """--compile: the engine times eager and compiled forward+backward on the first batch and keeps the faster
    (recorded in the checkpoint; a resume takes the record without measuring); compiled steps compute what
    the eager ones do (1e-5). The choice is forced to "compiled" here so that the compiled numerics are tested
    whatever this machine measures."""
    from convnext.models import optimize
    from convnext.train import engine

    measured = []

    def choose(model, fwd_bwd, **kw):
        forward, record = optimize.choose_training_forward(model, fwd_bwd, **kw)
        measured.append(dict(record))
        return forward, {**record, "how": "compiled"}

    monkeypatch.setattr(engine, "choose_training_forward", choose)
    fit(RegressionTask(config(tmp_path / "eager", epochs=2, warmup_epochs=0), dropout=0))
    fit(RegressionTask(config(tmp_path / "compiled", epochs=2, warmup_epochs=0, compile=True), dropout=0))
    assert len(measured) == 1 and set(measured[0]["timings_ms"]) == {"eager", "compiled"}
    a, b = state(tmp_path / "eager"), state(tmp_path / "compiled")
    assert a["step"] == b["step"] and b["train_forward"]["how"] == "compiled"
    assert b["train_forward"]["timings_ms"] == measured[0]["timings_ms"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-5)
    # one more epoch: the resumed run takes the recorded choice, it measures nothing
    fit(RegressionTask(config(tmp_path / "compiled", epochs=3, warmup_epochs=0, compile=True, resume="auto"),
                       dropout=0))
    c = state(tmp_path / "compiled")
    assert len(measured) == 1 and c["train_forward"] == b["train_forward"] and c["step"] == a["step"] * 3 // 2


def test_precision_auto_measures_once_trains_as_chosen_and_a_resume_takes_the_record(tmp_path, monkeypatch):
    """--precision auto on a CPU with native bf16: fp32 and bf16 forward+backward are timed on the first batch;
    the choice (forced to bf16 here, whatever this CPU measures) is what the run computes: its weights equal an
    explicit --precision bf16 run's and differ from fp32's; recorded in the checkpoint, taken by a resume
    without measuring. Without native bf16: fp32, nothing measured, the reason recorded."""
    from convnext.models import optimize
    from convnext.train import engine

    measured = []

    def choose(model, fwd_bwd, **kw):
        _, record = optimize.choose_training_precision(model, fwd_bwd, **kw)
        measured.append(dict(record))
        return "bf16", {**record, "precision": "bf16"}

    monkeypatch.setattr(engine, "native_low_precision", lambda dtype: True)
    monkeypatch.setattr("convnext.utils.native_low_precision", lambda dtype: True)  # (optimize's check)
    monkeypatch.setattr(engine, "choose_training_precision", choose)
    run = dict(epochs=2, warmup_epochs=0)
    summary = fit(RegressionTask(config(tmp_path / "auto", precision="auto", **run), dropout=0))
    fit(RegressionTask(config(tmp_path / "bf16", precision="bf16", **run), dropout=0))
    fit(RegressionTask(config(tmp_path / "fp32", precision="fp32", **run), dropout=0))
    assert len(measured) == 1 and set(measured[0]["timings_ms"]) == {"fp32", "bf16"}
    auto, bf16, fp32 = (state(tmp_path / n) for n in ("auto", "bf16", "fp32"))
    assert auto["train_precision"]["precision"] == "bf16" and "train_precision" not in bf16
    assert summary["precision"] == "bf16" and summary["precision_choice"]["timings_ms"] == measured[0]["timings_ms"]
    for k in auto["model"]:
        torch.testing.assert_close(auto["model"][k], bf16["model"][k], atol=1e-6, rtol=1e-6)
    assert any(not torch.allclose(auto["model"][k], fp32["model"][k], atol=1e-5) for k in auto["model"])
    fit(RegressionTask(config(tmp_path / "auto", precision="auto", resume="auto", epochs=3, warmup_epochs=0),
                       dropout=0))
    assert len(measured) == 1 and state(tmp_path / "auto")["train_precision"] == auto["train_precision"]
    # no native bf16: fp32, unmeasured, and said why
    monkeypatch.setattr(engine, "native_low_precision", lambda dtype: False)
    summary = fit(RegressionTask(config(tmp_path / "plain", precision="auto", **run), dropout=0))
    assert len(measured) == 1 and summary["precision"] == "fp32"
    assert "no native bf16" in summary["precision_choice"]["reason"]
    for k in fp32["model"]:
        torch.testing.assert_close(state(tmp_path / "plain")["model"][k], fp32["model"][k], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    cmd, env = run_script(tmp_path / "ref", save_every_steps=1)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    out = tmp_path / "killed"
    cmd, env = run_script(out, "delay=0.05", save_every_steps=1)
    sigkill_when(cmd, out / "checkpoints" / "step-00000008.pt", env=env, timeout=120)  # epoch 2 of 3, mid-epoch
    assert state(out)["step"] < 18  # killed before the end
    cmd, env = run_script(out, save_every_steps=1, resume="auto")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr
    assert_same_run(state(tmp_path / "ref"), state(out))


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_double_batch(tmp_path):
    cmd, env = run_script(tmp_path / "one", "dropout=0", batch_size=16)
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == 0
    cmd, env = run_script(tmp_path / "two", "dropout=0", nproc=2, batch_size=8)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 16 (8 x 1 x 2 processes)" in r.stderr
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], abs=1e-5)
        assert ha["val_mse"] == pytest.approx(hb["val_mse"], abs=1e-5)
        assert hb["val_count"] == 40  # exact distributed evaluation: every sample once
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-4)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = dict(arg.split("=", 1) for arg in sys.argv[2:])
    delay, dropout = float(settings.pop("delay", 0)), float(settings.pop("dropout", 0.1))
    from convnext.train.config import _coerce

    fit(RegressionTask(config(sys.argv[1], **{k: _coerce(EngineConfig, k, v) for k, v in settings.items()}),
                       dropout=dropout, step_delay=delay))
