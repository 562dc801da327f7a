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
    best_metric = "val_mse"
    higher_is_better = False
    loss_names = ("mse", "l1")

    def __init__(self, cfg: EngineConfig, dropout: float = 0.1, step_delay: float = 0.0) -> None:
        super().__init__(cfg)
        self.dropout = dropout  # random per rank: off where 2 processes must equal 1
        self.step_delay = step_delay  # slows steps down so that a test can kill the run mid-way

    def datasets(self, world_size):
        return RandomRegression(96, seed=1, augment=True), RandomRegression(40, seed=2, augment=False)

    def collate(self, items):
        x, y, idx = zip(*items)
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
    for ha, hb in zip(a["history"], b["history"]):
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
