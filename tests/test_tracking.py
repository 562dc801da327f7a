"""Watching a run (issue 23): per-step scalars in TensorBoard, W&B (offline), MLflow (a file store) and csv,
the same numbers in each, no step twice after a SIGKILL and `--resume auto`, and timm's summary.csv."""

import csv
import glob
import json
import os
import struct
import subprocess
import sys

import pytest
from PIL import Image

from helpers import run_main, sigkill_when

TRAIN = ["--model", "convnext_atto", "--epochs", 2, "--batch-size", 4, "--input-size", 32, "--aa", "none", "--mixup",
         0, "--cutmix", 0, "--reprob", 0, "--workers", 0, "--no-progress", "--threads", 1, "--log-every", 1]


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 8), ("val", 2)):
        for c, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), tuple(min(255, v + 7 * i) for v in color)).save(root / split / c / f"{i}.png")
    return root


def _scalars(logdir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]} | {
        "images": ea.Tags()["images"]}


def _wandb_history(run_file) -> list[dict]:
    """The history rows of a W&B offline run file: wandb's LevelDB-log record reader (wandb <= 0.17's
    sdk/internal/datastore.py: a 7-byte file header, 32 KiB blocks, records of crc32 + length + type), transcribed."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = open(run_file, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_tensorboard_and_csv_hold_every_step_once_after_a_sigkill_and_resume(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    def cmd(out, *extra):
        return [sys.executable, "-m", "convnext", "train", "--data", str(data), "--output", str(out), *map(str, TRAIN),
                "--log-to", "tensorboard,csv", "--save-every-steps", "1", *extra]

    r = subprocess.run(cmd(tmp_path / "ref"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    sigkill_when(cmd(out), out / "checkpoints" / "step-00000006.pt", env=env)  # mid epoch 2 (4 steps an epoch)
    r = subprocess.run(cmd(out, "--resume", "auto"), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    ref, got = _scalars(tmp_path / "ref" / "tensorboard"), _scalars(out / "tensorboard")
    want = {"train/loss", "train/lr", "train/grad_norm", "train/img_s", "train/data_wait_s", "train/memory_mb",
            "epoch/val_loss", "epoch/val_acc1", "epoch/train_loss"}
    assert want <= set(got) and got["images"] == ["curves"]  # (curves.png: the pictures a training run draws)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "epoch/val_loss"):
        steps = [s for s, _ in got[tag]]
        assert steps == sorted(set(steps)) == [s for s, _ in ref[tag]], tag  # every step once, none missing
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in ref[tag]], rel=1e-6), tag  # the same run
    assert [s for s, _ in ref["train/loss"]] == list(range(1, 9))
    rows = list(csv.DictReader((out / "train_steps.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    summary = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert list(summary[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]  # timm's
    assert [r["epoch"] for r in summary] == ["1", "2"]


def test_wandb_offline_and_mlflow_record_the_scalars_csv_records(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--data", data, "--output", out, *TRAIN, "--log-to", "wandb,mlflow,csv",
                            "--project", "pets")
    assert code == 0, err
    rows = list(csv.DictReader((out / "train_steps.csv").read_text().splitlines()))
    loss = {int(r["step"]): float(r["loss"]) for r in rows}
    assert sorted(loss) == list(range(1, 9))
    history = _wandb_history(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    logged = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == pytest.approx(loss, rel=1e-6)
    assert any("epoch/val_acc1" in h for h in history)
    from mlflow.tracking import MlflowClient

    client = MlflowClient((out / "mlruns").resolve().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "pets"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == pytest.approx(loss)
    assert run.data.params["model"] == "convnext_atto" and "epoch/val_acc1" in run.data.metrics
    import torch

    saved = torch.load(out / "last.pt", weights_only=True)["tracking"]  # what a resume continues
    assert saved["mlflow_run_id"] == run.info.run_id and history and saved["wandb_id"] in str(
        glob.glob(str(out / "wandb" / "offline-run-*"))[0])
    code, _, err = run_main(capsys, "train", "--data", data, "--output", out, *TRAIN[:2], "--epochs", 3, *TRAIN[4:],
                            "--log-to", "wandb,mlflow,csv", "--project", "pets", "--resume", "auto")
    assert code == 0, err
    (again,) = client.search_runs([experiment.experiment_id])  # the same MLflow run, continued
    assert again.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 13))
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(saved["wandb_id"]) for r in runs)  # W&B: the same run id, resumed


def test_a_tracker_that_is_not_installed_is_one_line(data, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_main(capsys, "train", "--data", data, "--output", tmp_path / "r", *TRAIN, "--log-to", "wandb")
    assert code == 2 and "--log-to wandb needs the wandb package: pip install 'convnext[wandb]'" in err
    code, _, err = run_main(capsys, "train", "--data", data, "--output", tmp_path / "r", *TRAIN, "--log-to", "comet")
    assert code == 2 and "--log-to comet: not a tracker" in err
    assert not (tmp_path / "r").exists()
