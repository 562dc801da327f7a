"""Training checkpoints that survive anything: atomic writes, step-numbered files, auto-resume.

A training state is a dict of tensors and plain Python values only, so it loads with
`torch.load(weights_only=True)` and no allow-list. Files are `checkpoints/step-XXXXXXXX.pt`
(the newest `keep` are kept) and `last.pt`, a hard link to the newest; `--resume auto` takes the
newest file that loads completely and skips any that do not (a partial write, a corrupt copy).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from ..utils import same_file
from ..weights.header import ModelFile, read_model_file
from ..weights.io import CheckpointError, atomic_write

logger = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"step-(\d+)\.pt$")


def save_state(output: str | os.PathLike, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Write `state` as checkpoints/step-{step}.pt atomically, point last.pt at it, prune old ones."""
    out = Path(output)
    path = out / "checkpoints" / f"step-{step:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    last = out / "last.pt"
    tmp = out / ".last.pt.link"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links: a second atomic copy
        atomic_write(tmp, lambda t: torch.save(state, t))
    os.replace(tmp, last)
    for old in sorted(_step_files(out))[:-keep]:
        old[1].unlink(missing_ok=True)
    return path


def _step_files(output: Path) -> list[tuple[int, Path]]:
    folder = output / "checkpoints"
    if not folder.is_dir():
        return []
    return [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.search(p.name))]


def load_state(path: str | os.PathLike) -> ModelFile:
    """A training state (`last.pt`, a step file), read through the one reader: its header and its contents."""
    file = read_model_file(path)
    file.training_state()  # raises for a file that is not a training state
    return file


def find_resume(output: str | os.PathLike) -> tuple[Path, ModelFile] | None:
    """The newest complete training checkpoint under `output` — the newest step file that loads, or `last.pt`
    where it is newer (a run leaves it even where `checkpoints/` is gone) — or None if none loads."""
    out = Path(output)
    newest = None
    for _, path in sorted(_step_files(out), reverse=True):
        newest = _try_load(path)
        if newest is not None:
            break
    last = out / "last.pt"
    if last.is_file() and not (newest is not None and same_file(last, newest[0])):
        found = _try_load(last)
        if found is not None and (newest is None or found[1].raw["step"] >= newest[1].raw["step"]):
            newest = found
    return newest


def _try_load(path: Path) -> tuple[Path, ModelFile] | None:
    try:
        return path, load_state(path)
    except (CheckpointError, FileNotFoundError) as e:
        logger.warning("skipping incomplete checkpoint %s (%s)", path, e)
        return None


def earlier_run(output: str | os.PathLike) -> list[Path]:
    """The files of an earlier run in `output` (what a new run would replace)."""
    out = Path(output)
    return [p for p in (out / "last.pt", out / "metrics.jsonl", out / "best.safetensors") if p.exists()] + \
        [p for _, p in sorted(_step_files(out))]


class OutputLock:
    """`output/.convnext.lock`: one training run at a time in a folder. Holds the pid and host of its run; a
    lock whose process is gone (same host), or that this torchrun job left before a restart, is taken over; a
    live one, or one of another host and job, makes the second run an error that names the first.
    Stale temporary files of interrupted writes are removed once the lock is held."""

    NAME = ".convnext.lock"

    def __init__(self, output: str | os.PathLike) -> None:
        self.path = Path(output) / self.NAME
        self.held = False

    def acquire(self) -> None:
        import json
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("TORCHELASTIC_RUN_ID")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._holder()
                stale = other is not None and other.get("host") == me["host"] and not _alive(other.get("pid"))
                restarted = other is not None and me["job"] is not None and other.get("job") == me["job"]
                if stale or restarted:  # its process is gone, or it is this torchrun job's, from before a restart
                    logger.info("taking over the lock %s of process %s (gone)", self.path, other.get("pid"))
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"process {other.get('pid')} on {other.get('host')}" if other else "another process"
                raise ValueError(f"{self.path.parent} is in use by a training run ({who}): wait for it, or choose "
                                 f"another --output (if that run is gone, delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            remove_stale_temps(self.path.parent)
            return
        raise ValueError(f"could not take the lock {self.path}; another run took it first")

    def _holder(self) -> dict | None:
        import json

        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|part)$")  # utils.temp_file's names: .<file>.<random 8>.tmp


def remove_stale_temps(output: Path) -> None:
    """Temporary files that an interrupted write left in `output` (and its checkpoints/), for a run holding the lock."""
    for folder in (output, output / "checkpoints"):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.is_file() and (_TEMP.match(p.name) or p.name == ".last.pt.link"):
                    logger.info("removing %s, left by an interrupted write", p)
                    p.unlink(missing_ok=True)
