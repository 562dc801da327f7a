"""Watching a run: `--log-to tensorboard,wandb,mlflow,csv` (rank 0 only), beside metrics.jsonl and summary.csv.

Every `--log-every` optimizer steps the engine hands `Tracking.step` the window's scalars (the mean loss and
each named loss, lr, grad norm, img/s, data-wait time, loss scale, memory); after every epoch `Tracking.epoch`
gets its metrics line and the run's pictures (curves.png, confusion_matrix.png, reconstructions.png). The
resolved config goes in as hyper-parameters. A resumed run continues the same tracked run: TensorBoard writes
to the same folder with `purge_step` at the resumed step (what a killed run logged after its last checkpoint
is dropped, so no step appears twice), W&B resumes the run id stored in the checkpoint (`resume="allow"`),
MLflow the run id stored likewise, csv drops its rows after the resumed step. Before every checkpoint the
trackers are flushed, so that what a kill loses is only what the resumed run logs again.

`summary.csv` (timm's columns: epoch, train_<loss>, eval_<metric>, lr; one row per epoch) is written always,
from the run's history, so a resumed run never repeats a row.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils import atomic_write

logger = logging.getLogger(__name__)

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "csv": None}  # -> its package
PICTURES = ("curves.png", "confusion_matrix.png", "reconstructions.png")
_TIMM_NAMES = {"val_acc1": "eval_top1", "val_acc5": "eval_top5"}


def parse_log_to(spec: str | Sequence[str] | None) -> list[str]:
    """`--log-to a,b` -> the tracker names, each checked: unknown or not installed is one line naming the fix."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec or []) if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--log-to {name}: not a tracker; choose from {', '.join(TRACKERS)} (comma-separated)")
        package = TRACKERS[name]
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"--log-to {name} needs the {package} package: pip install 'convnext[{name}]'")
    return list(dict.fromkeys(names))


def write_summary_csv(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """timm's summary.csv from the run's epoch lines: epoch, train_*, eval_* (val_acc1 -> eval_top1), lr."""
    keys: list[str] = []
    for line in history:
        for k in line:
            name = _summary_name(k)
            if name and name not in keys:
                keys.append(name)
    order = ["epoch", *[k for k in keys if k.startswith("train_")], *[k for k in keys if k.startswith("eval_")], "lr"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[k for k in order if k in keys], lineterminator="\n")
    writer.writeheader()
    for line in history:
        writer.writerow({_summary_name(k): v for k, v in line.items() if _summary_name(k)})
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


def _summary_name(key: str) -> str | None:
    if key in ("epoch", "lr") or (key.startswith("train_") and key not in ("train_time_s", "train_img_s")):
        return key
    if key.startswith("val_"):
        return _TIMM_NAMES.get(key, "eval_" + key[len("val_"):])
    return None


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class Tracking:
    """The trackers of one run (rank 0; elsewhere `Tracking([])`, which does nothing)."""

    def __init__(self, names: Sequence[str], out: Path, config: Mapping[str, Any], *, project: str,
                 saved: Mapping[str, Any] | None = None, resumed_step: int | None = None) -> None:
        self.names, self.out, self.saved = list(names), Path(out), dict(saved or {})
        self.tb = self.wandb = self.mlflow = None
        self.csv_path, self.csv_fields = self.out / "train_steps.csv", None
        hparams = _flat(config)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run logs from resumed_step + 1: what the killed run logged after its checkpoint is dropped
            self.tb = SummaryWriter(str(self.out / "tensorboard"),
                                    purge_step=None if resumed_step is None else resumed_step + 1)
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in hparams.items()), resumed_step or 0)
        if "wandb" in self.names:
            self._open_wandb(project, hparams)
        if "mlflow" in self.names:
            self._open_mlflow(project, hparams)
        if "csv" in self.names:
            self._truncate_csv(resumed_step)

    def _open_wandb(self, project: str, hparams: dict[str, Any]) -> None:
        import wandb

        import secrets

        run_id = self.saved.get("wandb_id") or secrets.token_hex(4)  # (W&B ids: [a-z0-9], 8 like its own)
        self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=self.out.name, id=run_id,
                                resume="allow", dir=str(self.out), config=hparams)
        self.saved["wandb_id"] = run_id

    def _open_mlflow(self, project: str, hparams: dict[str, Any]) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # the run folder's own file store (MLflow's local default)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((self.out / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", project))
        self.mlflow = mlflow.start_run(run_id=self.saved.get("mlflow_run_id"), run_name=self.out.name)
        self.saved["mlflow_run_id"] = self.mlflow.info.run_id
        if not self.saved.get("mlflow_params"):  # parameters are written once (MLflow refuses a changed value)
            items = list(hparams.items())
            for i in range(0, len(items), 100):
                mlflow.log_params({k: str(v)[:500] for k, v in items[i:i + 100]})
            self.saved["mlflow_params"] = True

    def _truncate_csv(self, resumed_step: int | None) -> None:
        """A resumed run: the rows of steps it will log again (and a row a kill cut short) are dropped."""
        if resumed_step is None or not self.csv_path.is_file():
            return
        lines = self.csv_path.read_text(encoding="utf-8").splitlines()
        rows = list(csv.DictReader(lines))
        keep = [r for r in rows if (r.get("step") or "").isdigit() and int(r["step"]) <= resumed_step
                and None not in r.values()]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=next(csv.reader(lines[:1])), lineterminator="\n")
        writer.writeheader()
        writer.writerows(keep)
        atomic_write(self.csv_path, lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))

    def _append_csv(self, row: Mapping[str, Any]) -> None:
        new = not self.csv_path.is_file()
        if self.csv_fields is None:  # (the file's header, read once: appending does not re-read the file)
            self.csv_fields = list(row) if new else next(csv.reader(
                self.csv_path.read_text(encoding="utf-8").splitlines()[:1]))
        with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.csv_fields, lineterminator="\n", extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tracked runs (stored in the checkpoint)."""
        return dict(self.saved)

    def step(self, step: int, scalars: Mapping[str, float]) -> None:
        """Per-step scalars (`train/<name>`) at optimizer step `step`."""
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if "csv" in self.names:
            self._append_csv({"step": step, **scalars})

    def epoch(self, step: int, line: Mapping[str, Any]) -> None:
        """An epoch's metrics line (`epoch/<key>`) and the run's pictures, at the step the epoch ended."""
        values = {k: float(v) for k, v in line.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        pictures = [p for p in (self.out / name for name in PICTURES) if p.is_file()]
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            for k, v in values.items():
                self.tb.add_scalar(f"epoch/{k}", v, step)
            for p in pictures:
                with Image.open(p) as im:
                    self.tb.add_image(p.stem, np.asarray(im.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({**{f"epoch/{k}": v for k, v in values.items()},
                            **{p.stem: wandb.Image(str(p)) for p in pictures}}, step=step)
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics({f"epoch/{k}": v for k, v in values.items()}, step=step)
            for p in pictures:
                mlflow.log_artifact(str(p))

    def flush(self) -> None:
        """Everything logged so far on disk (before a checkpoint: a killed run's steps up to it survive)."""
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
        self.tb = self.wandb = self.mlflow = None


class StepWindow:
    """The steps since the last per-step log: their mean losses, img/s and the time the loop waited for data."""

    def __init__(self) -> None:
        self.grad_norm: float | None = None  # of the last step, set by the engine on logged steps
        self.start(None, 0)

    def start(self, progress: Any, n_images: int) -> None:
        self.t0 = self.mark = time.perf_counter()
        self.wait, self.images = 0.0, n_images
        self.sums = dict(progress.loss_sums) if progress is not None else {}
        self.count = progress.loss_count if progress is not None else 0

    def batch_arrived(self) -> None:
        self.wait += time.perf_counter() - self.mark

    def batch_done(self) -> None:
        self.mark = time.perf_counter()

    def scalars(self, progress: Any, n_images: int, lr: float, extras: Mapping[str, float]) -> dict[str, float]:
        """The window's scalars; a new window starts."""
        now, n = time.perf_counter(), progress.loss_count - self.count
        out = {k: (v - self.sums.get(k, 0.0)) / max(n, 1) for k, v in progress.loss_sums.items()}
        out.update(lr=lr, img_s=(n_images - self.images) / max(now - self.t0, 1e-9), data_wait_s=self.wait)
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out.update(extras)
        self.start(progress, n_images)
        self.grad_norm = None
        return out
