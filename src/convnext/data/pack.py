"""`convnext data pack SRC OUT --format wds|hf`: an image folder (split folders of class folders, one folder of
class folders, or a flat folder with a labels file) as WebDataset shards or a Hugging Face dataset; and
`convnext data info SRC`: what a data source holds.

Packing is atomic: everything is written into a hidden folder beside OUT, renamed to OUT at the end, so a
killed pack leaves no OUT and no half-written shard. Shards are named `<name>-<split>-000000.tar` with members
`<key>.<ext>` + `<key>.cls` (the class index), in the folder's sample order (so a pack trains as its folder
does); `_info.json` holds the splits' file lists and counts, the classes and each shard's sha256 (timm's wds
layout plus our fields). `--resize-short N` re-encodes as JPEG (`--quality`) with the shorter side at most N.
Images are read and encoded in `workers` processes, written in order by this one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from .errors import DataError

SPLITS = ("train", "validation", "val", "test")
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64MiB', '1000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m[2].lower() not in _UNITS or float(m[1]) <= 0:
        raise DataError(f"--shard-size {text!r}: a size such as 1GB, 500MB or 64MiB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def source_splits(src: Path, labels: str | None, split: str) -> dict[str, Any]:
    """{split name: ImageFolder-like} of a folder: its split sub-folders, else itself (as `split`), or with
    `labels` its listed images (as `split`)."""
    from .folder import ImageFolder, LabelledFiles

    if not src.is_dir():
        raise DataError(f"{src}: no such folder")
    if labels is not None:
        return {split: LabelledFiles(src, labels, seed=None)}
    found = [s for s in SPLITS if (src / s).is_dir()]
    if found:
        train = ImageFolder(src / found[0], seed=None)
        out = {("validation" if s == "val" else s): ImageFolder(src / s, classes=train.classes, seed=None)
               for s in found[1:]}
        return {("validation" if found[0] == "val" else found[0]): train} | out
    return {split: ImageFolder(src, seed=None)}


def _encode(job: tuple[str, int | None, int]) -> tuple[bytes, str] | tuple[None, str]:
    """(the bytes to store, their extension) of one image file; (None, reason) for an unreadable one."""
    path, short, quality = job
    try:
        if short is None:
            from .images import load_rgb

            load_rgb(path, exif=False)  # readable? (stored as it is: its own format and bytes)
            ext = Path(path).suffix.lower().lstrip(".")
            return Path(path).read_bytes(), "jpg" if ext == "jpeg" else ext
        from PIL import Image

        from .images import load_rgb

        img = load_rgb(path)
        scale = short / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"
    except Exception as e:  # noqa: BLE001 - a bad image is skipped and counted, not a failed pack
        return None, f"{type(e).__name__}: {e}"


def _encoded(ds, short: int | None, quality: int, workers: int) -> Iterator[tuple[int, bytes | None, str]]:
    jobs = [(p, short, quality) for p, _ in ds.samples]
    if workers <= 1:
        yield from ((i, *_encode(j)) for i, j in enumerate(jobs))
        return
    with ProcessPoolExecutor(workers) as pool:
        yield from ((i, *r) for i, r in enumerate(pool.map(_encode, jobs, chunksize=16)))


class _ShardSink:
    """Tar shards of at most `limit` bytes (a shard holds at least one sample), each hashed once written."""

    def __init__(self, folder: Path, stem: str, limit: int) -> None:
        self.folder, self.stem, self.limit = folder, stem, limit
        self.files: list[str] = []
        self.sha: dict[str, str] = {}
        self.tar, self.size = None, 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(v) + 1024 for v in members.values())
        if self.tar is not None and self.size + size > self.limit:
            self.close()
        if self.tar is None:
            name = f"{self.stem}-{len(self.files):06d}.tar"
            self.files.append(name)
            self.tar, self.size = tarfile.open(self.folder / name, "w", format=tarfile.USTAR_FORMAT), 0
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.size += size

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            name = self.files[-1]
            self.sha[name] = hashlib.sha256((self.folder / name).read_bytes()).hexdigest()
            self.tar = None


def pack(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "wds", labels: str | None = None,
         split: str = "train", shard_size: str = "1GB", resize_short: int | None = None, quality: int = 95,
         workers: int = 1, name: str | None = None, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pack `src` into `out` (see the module doc); returns the manifest (`_info.json` for wds)."""
    src, out = Path(src), Path(out)
    if fmt not in ("wds", "hf"):
        raise DataError(f"--format must be wds or hf, got {fmt!r}")
    if resize_short is not None and resize_short < 1 or not 1 <= quality <= 100 or workers < 1:
        raise DataError("--resize-short must be >= 1, --quality in 1..100, --workers >= 1")
    if out.exists() and not force:
        raise DataError(f"{out} exists: pass --force to replace it")
    if out.resolve() == src.resolve() or out.resolve().is_relative_to(src.resolve()):
        raise DataError(f"{out} is inside {src}: the pack would become part of its own input")
    limit = parse_size(shard_size)
    splits = source_splits(src, labels, split)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        writer = _pack_wds if fmt == "wds" else _pack_hf
        manifest = writer(splits, tmp, name or src.resolve().name, limit, resize_short, quality, workers, progress)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _remove_stale(out: Path) -> None:
    """The hidden folders of earlier packs into `out` that were killed (their process is gone)."""
    for old in out.parent.glob(f".{out.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
            alive = int(pid) != os.getpid()
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(old, ignore_errors=True)


def _samples(ds, split: str, resize_short, quality, workers, progress, bad: list[str]):
    """(index, data, ext) of each readable image of a split, with a progress bar; the unreadable ones in `bad`."""
    from tqdm import tqdm

    for i, data, ext in tqdm(_encoded(ds, resize_short, quality, workers), total=len(ds), desc=f"pack {split}",
                             disable=not progress, leave=False):
        if data is None:
            bad.append(f"{ds.samples[i][0]} ({ext})")
            continue
        yield i, data, ext


def _pack_wds(splits, folder: Path, name: str, limit: int, resize_short, quality, workers, progress) -> dict:
    classes = next(iter(splits.values())).classes
    info: dict[str, Any] = {"name": name, "classes": classes, "splits": {}, "created": time.strftime("%Y-%m-%d"),
                            "skipped": []}
    for split, ds in splits.items():
        sink, count = _ShardSink(folder, f"{name}-{split}", limit), 0
        for i, data, ext in _samples(ds, split, resize_short, quality, workers, progress, info["skipped"]):
            sink.write(f"{split}_{i:08d}", {ext: data, "cls": str(ds.target(i)).encode()})
            count += 1
        sink.close()
        info["splits"][split] = {"num_samples": count, "filenames": sink.files, "sha256": sink.sha}
    (folder / "_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def _pack_hf(splits, folder: Path, name: str, limit: int, resize_short, quality, workers, progress) -> dict:
    from .hf import require_datasets

    datasets = require_datasets()
    classes = next(iter(splits.values())).classes
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    skipped: list[str] = []
    parts = {}
    for split, ds in splits.items():
        rows = [(data, ds.target(i)) for i, data, _ in _samples(ds, split, resize_short, quality, workers, progress,
                                                                skipped)]
        parts[split] = datasets.Dataset.from_dict({"image": [{"bytes": d, "path": None} for d, _ in rows],
                                                   "label": [t for _, t in rows]}, features=feats)
    if not progress:
        datasets.disable_progress_bars()
    datasets.DatasetDict(parts).save_to_disk(str(folder), max_shard_size=limit)
    return {"name": name, "classes": classes, "splits": {s: {"num_samples": len(d)} for s, d in parts.items()},
            "skipped": skipped}


def describe(src: str) -> dict[str, Any]:
    """What `src` (a folder, hf:..., wds:...) holds: its kind, splits with counts, classes."""
    from .sources import kind, open_split

    k = kind(src)
    if k == "folder":
        splits = {s: ds for s, ds in source_splits(Path(src), None, "train").items()}
    else:
        splits = {}
        for s in ("train", "validation", "test"):
            try:
                splits[s] = open_split(src, s, seed=None)
            except DataError as e:
                if "split" not in str(e):
                    raise
    if not splits:
        raise DataError(f"{src}: no train, validation or test split found")
    classes = next(iter(splits.values())).classes
    return {"source": src, "kind": k, "classes": classes, "splits": {s: len(d) for s, d in splits.items()}}


def format_info(info: dict[str, Any]) -> str:
    c = info["classes"]
    lines = [f"{info['source']}: {info['kind']}, {len(c)} classes ({', '.join(c[:5])}{', ...' if len(c) > 5 else ''})"]
    lines += [f"  {s}: {n} images" for s, n in info["splits"].items()]
    return "\n".join(lines)
