"""Reading and writing checkpoint files: the one safe loader, our safetensors format, downloads.

Every checkpoint in this library is read by `read_checkpoint`: safetensors files with
`safetensors`, everything else with `torch.load(weights_only=True)`. There is no unsafe fallback: a
pickle that needs arbitrary code is refused, and its payload never runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..utils import atomic_write, cache_dir, temp_file

logger = logging.getLogger(__name__)

_LFS_POINTER = b"version https://git-lfs.github.com/spec"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (missing, empty, truncated, unsafe, wrong layout)."""


def _resolve_file(path: Path) -> Path:
    """A directory (as Hugging Face's save_pretrained writes) resolves to its weight file."""
    if path.is_dir():
        for name in HF_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: directory holds none of {', '.join(HF_WEIGHT_FILES)}")
    return path


def _kind(path: Path, head: bytes) -> str | None:
    """What the first bytes say the file is: "safetensors", "zip" (torch.save), "pickle", or None."""
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # an 8-byte little-endian header length, then a JSON object
    if path.suffix == ".safetensors":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"  # torch's legacy (pre-1.6) format and plain pickles start with PROTO 2..5
    return None


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason}); it may be truncated") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not an unsafe pickle: opcodes that make no valid pickle at all
            raise CheckpointError(f"{path}: cannot read checkpoint (not a valid pickle); the file is corrupt") from None
        reason = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "unsupported global")
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects other than tensors and plain data "
            f"({reason}). Loading it would run code from the file. If you trust its source, convert it "
            f"once yourself with torch.load(..., weights_only=False) and save the state dict"
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure of a damaged file is one clear error
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({reason}); the file may be truncated or corrupt") from None


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a checkpoint file safely; returns (top-level object as a dict, safetensors metadata).

    Raises `CheckpointError` (one line naming the file) for every file that is not a readable
    checkpoint: empty, Git-LFS pointer, text or other non-checkpoint files, truncated or corrupt
    ones, and pickles that contain anything but tensors and plain data (which never run).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    path = _resolve_file(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty (an interrupted download or copy?)")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(_LFS_POINTER):
        raise CheckpointError(f"{path}: this is a Git LFS pointer, not the weights; run `git lfs pull` "
                              "or download the real file")
    kind = _kind(path, head)
    if kind is None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint or safetensors file")
    if kind == "safetensors":
        return _read_safetensors(path)
    obj = _read_torch(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return dict(obj), {}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, Any]) -> None:
    """Write tensors (made contiguous, shared storage split) with JSON-encoded metadata, atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, *, sha256: str | None = None, filename: str | None = None,
             progress: bool = True) -> Path:
    """Fetch `url` into the cache once and return the local path; verify what is known.

    A full `sha256` is checked in full; a short one (torchvision's file-name prefix) as a prefix.
    With no published hash, the hash of the first download is recorded beside the file and any
    later change of that file is refused. Files are written atomically (temp file, then rename).
    """
    root = cache_dir()
    dst = root / (filename or url.rsplit("/", 1)[-1])
    record = dst.with_name(dst.name + ".sha256")
    if not dst.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = temp_file(root, prefix=f".{dst.name}.", suffix=".part")
        try:
            torch.hub.download_url_to_file(url, tmp, progress=progress)
        except Exception as e:
            Path(tmp).unlink(missing_ok=True)
            raise CheckpointError(
                f"could not download {url} ({type(e).__name__}: {e}). If this machine is offline, fetch the "
                f"file elsewhere and pass its path instead (pretrained='/path/to/{dst.name}'), or place it at {dst}"
            ) from None
        got = sha256_file(tmp)
        if sha256 and not got.startswith(sha256.lower()):
            Path(tmp).unlink(missing_ok=True)
            raise CheckpointError(f"{url}: sha256 {got} does not match the published {sha256}; file discarded")
        os.replace(tmp, dst)
        if not sha256:
            record.write_text(got + "\n")
        return dst
    got = sha256_file(dst)
    expected = sha256.lower() if sha256 else (record.read_text().strip() if record.exists() else None)
    if expected and not got.startswith(expected):
        raise CheckpointError(f"{dst}: sha256 {got} differs from {'the published' if sha256 else 'the recorded'} "
                              f"{expected}; the cached file changed. Delete it to download again")
    if expected is None:
        record.write_text(got + "\n")
    return dst
