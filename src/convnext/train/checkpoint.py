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
    """The newest complete training checkpoint under `output`, or None if there is none."""
    for _, path in sorted(_step_files(Path(output)), reverse=True):
        try:
            return path, load_state(path)
        except (CheckpointError, FileNotFoundError) as e:
            logger.warning("skipping incomplete checkpoint %s (%s)", path, e)
    return None
