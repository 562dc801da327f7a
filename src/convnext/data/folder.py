"""Image-folder datasets (`ROOT/<class>/<image>`), validated up front, decoding that never crashes.

Samples are addressed by `(epoch, index)` (what `EpochSampler` yields): random augmentation is
seeded from (seed, epoch, index), so a run is bitwise reproducible whatever the number of
workers, and resumable in the middle of an epoch.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..utils import seeded
from .errors import DataError
from .images import IMG_EXTENSIONS, load_rgb

logger = logging.getLogger(__name__)


def find_classes(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    return classes


def scan_images(root: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path, class index) for every image file under root/<class>/, sorted for determinism."""
    samples, empty, skipped = [], [], []
    for ci, c in enumerate(classes):
        folder = root / c
        if not folder.is_dir():
            raise DataError(f"{root} is missing class folder {c!r}")
        files = sorted(walk_images(folder, skipped))
        if not files:
            empty.append(c)
        samples.extend((f, ci) for f in files)
    if empty:
        raise DataError(f"{root}: class folder(s) with no images: {', '.join(empty[:10])}"
                        + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else ""))
    if skipped:
        logger.warning("%s: not followed %d symlinked folder(s) (a loop, a folder seen already, or one outside its "
                       "class folder): %s", root, len(skipped), ", ".join(skipped[:5]))
    return samples


def walk_images(folder: Path, skipped: list[str] | None = None) -> list[str]:
    """Image files under `folder` at any depth. Symlinks to files are followed; a symlinked folder only when
    it leads to a folder inside `folder` not visited yet (never round a loop, never out of the class): what
    is not followed goes to `skipped`."""
    top = os.path.realpath(folder)
    seen, files = {top}, []
    for dirpath, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(dirpath, d))
            if d.startswith(".") or real in seen or not real.startswith(top + os.sep):
                if not d.startswith(".") and skipped is not None:
                    skipped.append(os.path.join(dirpath, d))
                continue
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        files += [os.path.join(dirpath, f) for f in names if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return files


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63 - 1)


COMPLETE, PARTIAL = ".complete", ".convnext-partial"  # the markers of folders we generate


def write_once(root: str | os.PathLike, marker: str, build: Callable[[Path], None]) -> Path:
    """A generated folder, written once: `build(tmp)` fills a `.partial` sibling, which replaces `root` whole
    once complete (marked with `marker`, what it holds); a folder already complete with the same marker is
    kept as it is, and an interrupted write never passes for a complete one.

    Only folders we wrote are ever removed: `root` (or its `.partial`) must be missing, empty, or carry our
    marker; anything else is the user's and is a `DataError` that touches nothing.
    """
    import shutil

    root = Path(root)
    if (root / COMPLETE).is_file() and (root / COMPLETE).read_text() == marker:
        return root
    tmp = root.with_name(root.name + ".partial")
    for folder, ours in ((root, COMPLETE), (tmp, PARTIAL)):
        if folder.exists() and not (folder.is_dir() and ((folder / ours).is_file() or not any(folder.iterdir()))):
            raise DataError(f"{folder} exists and was not written by convnext (it has no {ours} marker): "
                            f"move it away or choose another --output; nothing was removed")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL).write_text(marker)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / PARTIAL).unlink()
    (tmp / COMPLETE).write_text(marker)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def _index_folders(found: Sequence[str], classes: Sequence[str]) -> bool:
    """Folders named by class index (`0`, `1`, ...: ImageNet-V2) for a model whose classes have other names:
    every folder a canonical integer below the class count, none a class name."""
    known = set(classes)
    return bool(found) and all(f.isdigit() and str(int(f)) == f and int(f) < len(classes) and f not in known
                               for f in found)


class ImageFolder(Dataset):
    """`root/<class>/<image>` with an optional fixed class list (training's, at eval time).

    `__getitem__((epoch, index))` returns `(image, target, index)`; an unreadable image returns
    `(None, target, index)` and its error is reported by the training loop with its path. `seed=None`: a
    deterministic transform, run unseeded (evaluation); `exif=False`: EXIF orientation not applied.
    """

    exif = True
    decode = "cpu"  # `--decode` (data.decode): "cpu-draft" and "gpu" leave decoding to the transform / device

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, seed: int | None = 0, cache: bool = False,
                 exif: bool = True) -> None:
        self.root, self.exif = Path(root), exif
        found = find_classes(self.root)
        if classes is not None and _index_folders(found, classes):  # `0/ .. 999/` (ImageNet-V2's layout)
            logger.info("%s: class-index folders (0 .. %d), each the model's class of that index",
                        self.root, len(classes) - 1)
            self.classes = list(classes)
            self.samples = [(p, int(found[t])) for p, t in scan_images(self.root, found)]
        elif classes is not None:
            extra = sorted(set(found) - set(classes))
            missing = sorted(set(classes) - set(found))
            if extra:
                raise DataError(f"{self.root} has classes the model does not know: {', '.join(extra[:10])}")
            if missing:
                logger.warning("%s has no folder for %d of the model's classes (%s)", self.root, len(missing),
                               ", ".join(missing[:5]))
            self.classes = list(classes)
            self.samples = scan_images(self.root, [c for c in classes if c in found])
            remap = [self.classes.index(c) for c in classes if c in found]
            self.samples = [(p, remap[t]) for p, t in self.samples]
        else:
            self.classes = found
            self.samples = scan_images(self.root, found)
        self.transform = transform
        self.seed = seed
        # Decoded images kept in memory (per process): for small datasets that fit in RAM, saves the
        # file read and decode on every epoch.
        self.cache: dict[int, Any] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def target(self, index: int) -> int:
        return self.samples[index][1]

    def file(self, index: int):
        """Sample `index`'s image file: a path, or its bytes as a `BytesIO` (what `PIL.Image.open` reads)."""
        return self.samples[index][0]

    def load(self, index: int):
        """Sample `index`'s image (decoded RGB PIL); raises for an unreadable one."""
        return load_rgb(self.file(index), self.exif)

    def sample_name(self, index: int) -> str:
        """What names sample `index` in messages and in a run's data fingerprint."""
        return self.samples[index][0]

    def unreadable_reason(self, index: int) -> str:
        """Why sample `index` failed in a loader worker (decoded again here, to say why)."""
        try:
            self.load(index)
            return "failed to decode in a worker"
        except Exception as e:  # noqa: BLE001 - any decoder failure is the reason we report
            return f"{type(e).__name__}: {e}"

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        target = self.target(index)
        if self.decode != "cpu":
            return self._undecoded(epoch, index), target, index
        img = self.cache.get(index) if self.cache is not None else None
        if img is None:
            try:
                img = self.load(index)
            except Exception:  # noqa: BLE001 - any decoder failure means "bad image", never a dead worker
                return None, target, index
            if self.cache is not None:
                self.cache[index] = img
        if self.transform is not None and self.seed is None:
            img = self.transform(img)
        elif self.transform is not None:
            img = seeded(self.transform, _sample_seed(self.seed, epoch, index), img)
        return img, target, index

    def _undecoded(self, epoch: int, index: int) -> Any:
        """`--decode cpu-draft`: the transform on the opened image (its crop decodes what it needs); `gpu`: an
        `Encoded` for the device. None for an unreadable image."""
        from PIL import Image

        from .decode import Undecoded, encode_for_device

        seed = None if self.seed is None else _sample_seed(self.seed, epoch, index)
        try:
            if self.decode == "gpu":
                return encode_for_device(self.file(index), seed, self.exif)
            item = Undecoded(Image.open(self.file(index)), self.exif)
            return self.transform(item) if seed is None else seeded(self.transform, seed, item)
        except Exception:  # noqa: BLE001 - any decoder failure means "bad image", never a dead worker
            return None


class LabelledFiles(ImageFolder):
    """Images of a flat (or any) folder labelled by a file: CSV with a header row (`filename` or `path`,
    relative to `root`, and `label`; also Kaggle's `LOC_val_solution.csv`) or JSON lines with those keys; or
    the ILSVRC2012 devkit (its folder, archive or ground-truth .txt: `imagenet.devkit_labels`) for the flat
    `ILSVRC2012_val_*.JPEG`. A label is a class of `classes` (e.g. a synset), a readable ImageNet name that
    names one class only (`tench`), or a class index; without `classes`, the sorted distinct labels are the
    classes. A label the model does not know, a file listed twice or a missing file is a `DataError` naming
    the line; the devkit lists all 50,000 images, and those missing from `root` are only counted (a warning).
    Items as ImageFolder's. `multi_label`: a row's label lists classes, `a;b` (CSV) or a JSON list; its target
    is the tuple of their indices."""

    def __init__(self, root: str | os.PathLike, labels: str | os.PathLike, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, seed: int | None = 0, cache: bool = False,
                 exif: bool = True, multi_label: bool = False) -> None:
        self.root, rows, self.exif = Path(root), read_label_file(labels), exif
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        parts = {where: _parts(label, where, multi_label) for _, label, where in rows}
        self.classes = list(classes) if classes is not None else sorted({c for p in parts.values() for c in p})
        lookup = _label_lookup(self.classes)
        self.samples, seen, absent, listing = [], set(), 0, _is_devkit(labels)
        for name, _, where in rows:
            path = self.root / name
            bad = next((c for c in parts[where] if c not in lookup), None)
            if bad is not None:
                raise DataError(f"{where}: label {bad!r} is not one of the {len(self.classes)} classes "
                                f"({', '.join(self.classes[:3])}, ...; an index 0..{len(self.classes) - 1} also works)")
            if not path.is_file() and listing:
                absent += 1
                continue
            if not path.is_file():
                raise DataError(f"{where}: {path} is listed but missing")
            if path in seen:
                raise DataError(f"{where}: {name} is listed twice")
            seen.add(path)
            ids = tuple(sorted({lookup[c] for c in parts[where]}))
            self.samples.append((str(path), ids if multi_label else ids[0]))
        if not self.samples:
            raise DataError(f"{labels} lists no images" + (f" that are in {self.root}" if absent else ""))
        if absent:
            logger.warning("%s: %d of the %d images the devkit lists are not there; the results are for the %d "
                           "present, not the whole validation set", self.root, absent, len(rows), len(self.samples))
        self.transform, self.seed = transform, seed
        self.cache = {} if cache else None


def _parts(label: str, where: str, multi_label: bool) -> list[str]:
    """The classes a labels-file row names: one, or with `multi_label` those of `a;b` (a JSON list comes as that)."""
    listed = label.startswith("\x1e") or ";" in label  # a JSON list, or `a;b`
    found = [p.strip() for p in label.lstrip("\x1e").split(";") if p.strip()] if listed or multi_label else [label]
    if not multi_label and len(found) > 1:
        raise DataError(f"{where}: a list of labels; pass --multi-label to train on several classes per image")
    if not found:
        raise DataError(f"{where}: no label")
    return found


def _is_devkit(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() or p.name.lower().endswith((".tar.gz", ".tgz", ".tar", ".txt"))


def read_label_file(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(file name, label, "FILE:LINE") per row of a CSV (header `filename|path,label`), JSONL labels file or
    the ILSVRC2012 devkit (`imagenet.devkit_labels`)."""
    import csv
    import json

    path = Path(path)
    if _is_devkit(path):
        from .imagenet import devkit_labels

        return devkit_labels(path)
    if not path.is_file():
        raise DataError(f"labels file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    else:
        reader = csv.DictReader(text.splitlines())
        rows = [(n, row) for n, row in enumerate(reader, 2)]
    out = []
    for n, row in rows:
        if isinstance(row, dict) and row.get("ImageId") and row.get("PredictionString"):  # LOC_val_solution.csv
            row = {"filename": row["ImageId"] + ".JPEG", "label": row["PredictionString"].split()[0]}
        name = row.get("filename", row.get("path")) if isinstance(row, dict) else None
        label = row.get("label", row.get("labels")) if isinstance(row, dict) else None
        if isinstance(label, list):  # JSONL: several classes ("\x1e": it came as a list, for a clear error)
            label = "\x1e" + ";".join(str(v) for v in label) if label else None
        if name in (None, "") or label in (None, ""):
            raise DataError(f"{path}:{n}: each row needs `filename` (or `path`) and `label`, got {row!r}")
        out.append((str(name), str(label), f"{path}:{n}"))
    return out


def _label_lookup(classes: Sequence[str]) -> dict[str, int]:
    """label -> class index: the class ids, their indices, and readable ImageNet names that are unambiguous."""
    from .imagenet import display_name

    lookup = {str(i): i for i in range(len(classes))}
    names: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        names.setdefault(display_name(c), []).append(i)
    lookup.update({name: idx[0] for name, idx in names.items() if len(idx) == 1})
    lookup.update({c: i for i, c in enumerate(classes)})  # a class's own id wins over an index or a name
    return lookup


class ImageFiles(ImageFolder):
    """Every image under `root`, at any depth, without labels (labelled sub-folders are fine and ignored).

    Items are `(image, -1, index)` as ImageFolder's, with the same seeding, caching and bad-image handling.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, seed: int = 0,
                 cache: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {self.root}")
        skipped: list[str] = []
        files = walk_images(self.root, skipped)
        if skipped:
            logger.warning("%s: not followed %d symlinked folder(s) (a loop, a folder seen already, or one outside "
                           "it): %s", self.root, len(skipped), ", ".join(skipped[:5]))
        if not files:
            raise DataError(f"{self.root} holds no images ({', '.join(IMG_EXTENSIONS)}) at any depth")
        self.classes: list[str] = []
        self.samples = [(f, -1) for f in sorted(files)]
        self.transform, self.seed = transform, seed
        self.cache = {} if cache else None

    def subset(self, indices: Sequence[int], transform: Callable | None = None) -> ImageFiles:
        """The same files at `indices` (e.g. a fixed set of images to look at), with another transform."""
        sub = copy.copy(self)
        sub.samples = [self.samples[i] for i in indices]
        sub.transform = transform if transform is not None else self.transform
        sub.cache = {} if self.cache is not None else None  # indices differ: not the same cache
        return sub


def split_folder(root: str | os.PathLike, split: str) -> Path:
    """`root/split`; "validation" and "val" find each other (the hub's name and ours), as do "valid"."""
    root = Path(root)
    names = ("validation", "val", "valid") if split in ("validation", "val", "valid") else (split,)
    return next((root / n for n in (split, *names) if (root / n).is_dir()), root / split)


def class_weights(spec: str, targets: Sequence[int], classes: Sequence[str]) -> torch.Tensor:
    """`--class-weights`: "auto" -> n / (classes x count) per class (sklearn's "balanced"; 0 for a class with no
    sample), or a file: one weight per line in class order, or `class,weight` lines."""
    n = len(classes)
    if spec == "auto":  # (several classes per image: each counts where it is present)
        flat = [c for t in targets for c in (t if isinstance(t, tuple) else (t,))]
        counts = torch.bincount(torch.as_tensor(flat, dtype=torch.long), minlength=n).double()
        return torch.where(counts > 0, len(targets) / (n * counts.clamp(min=1)), 0.0).float()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--class-weights {spec}: neither auto nor a file")
    rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            and not line.startswith("#")]
    named = all("," in r for r in rows)
    try:
        values = {r.rsplit(",", 1)[0].strip(): float(r.rsplit(",", 1)[1]) for r in rows} if named else \
            dict(zip(classes, [float(r) for r in rows], strict=False))
    except ValueError as e:
        raise DataError(f"--class-weights {spec}: {e}; one number per line, or class,weight") from None
    missing = [c for c in classes if c not in values]
    if missing or len(values) != n or not all(math.isfinite(v) and v >= 0 for v in values.values()):
        raise DataError(f"--class-weights {spec}: {len(values)} weights for {n} classes"
                        + (f" (none for {missing[0]})" if missing else "") + "; each finite and >= 0")
    return torch.tensor([values[c] for c in classes], dtype=torch.float32)


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train/val class mismatch: only in train {only_train[:5]}, only in val {only_val[:5]}")


class EpochSampler(Sampler):
    """torch's DistributedSampler, tagged with the epoch and able to start mid-epoch.

    Yields `(epoch, index)`; `set_epoch(e, start)` skips the first `start` samples of this
    process's share, which is how a mid-epoch resume continues exactly where it stopped.

    `weights` (one per sample; the balanced sampler): each epoch draws `n` samples with replacement, with
    probability proportional to their weight, from a generator seeded by (seed, epoch) alone (the same draw in
    every process), then shares them out as DistributedSampler does (padded to a multiple of the processes,
    every `world_size`-th from `rank`): seeded, distributed and resumable as the uniform order.

    `groups` (the samples of each WebDataset shard; `--sample-order shards`): each epoch's order visits the
    groups one after another, in an order shuffled from (seed, epoch), each group's samples shuffled within it,
    then shared out the same way: every process reads the same shard at the same time (one file's pages, not
    the whole data set's), and the epoch is still every sample once, exactly, and resumable.
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 weights: Sequence[float] | None = None, groups: Sequence[Sequence[int]] | None = None) -> None:
        self.inner = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch, self.start = 0, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        if self.weights is not None and (len(self.weights) != n or not (self.weights >= 0).all()
                                         or not self.weights.sum() > 0):
            raise ValueError(f"weights: {n} non-negative numbers, not all 0, one per sample")
        if groups is not None and sorted(i for g in groups for i in g) != list(range(n)):
            raise ValueError(f"groups: every sample index 0..{n - 1} in exactly one group")
        if groups is not None and weights is not None:
            raise ValueError("weights or groups: one order at a time")
        self.groups = None if groups is None else [list(g) for g in groups]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def _order(self):
        if self.weights is None and self.groups is None:
            return iter(self.inner)
        g = torch.Generator().manual_seed(self.inner.seed + self.epoch)
        if self.groups is not None:
            draw = [self.groups[k][i] for k in torch.randperm(len(self.groups), generator=g).tolist()
                    for i in torch.randperm(len(self.groups[k]), generator=g).tolist()]
        else:
            draw = torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g).tolist()
        world, rank = self.inner.num_replicas, self.inner.rank
        draw += draw[: self.inner.total_size - len(draw)]
        return iter(draw[rank:self.inner.total_size:world])

    def __iter__(self):
        for k, i in enumerate(self._order()):
            if k >= self.start:
                yield (self.epoch, i)

    def __len__(self) -> int:
        return len(self.inner) - self.start


def one_thread_worker(_: int) -> None:
    """A DataLoader's `worker_init_fn`: one torch thread per loader worker, so that workers do not fight the
    main process's threads for cores."""
    torch.set_num_threads(1)


class ShardSampler(Sampler):
    """Every index exactly once across ranks (no padding): exact distributed evaluation."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Batch:
    """One loader batch, as every task's collate function delivers it to the training engine."""

    inputs: Any  # what the model takes: an (N, C, H, W) tensor, a list of images (detection); None if empty
    targets: Any = None  # labels, boxes/masks, pixel maps; None when self-supervised
    indices: list[int] = field(default_factory=list)  # dataset indices of the samples in the batch
    bad: list[int] = field(default_factory=list)  # dataset indices that could not be read (left out)

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device, *, channels_last: bool = False) -> Batch:
        """The batch on `device` (tensors, lists of tensors, lists of dicts of tensors), image batches in
        channels-last memory when asked: what the engine hands a task's loss and evaluation."""
        def move(x: Any, images: bool) -> Any:
            if isinstance(x, torch.Tensor):
                x = x.to(device, non_blocking=True)
                return x.contiguous(memory_format=torch.channels_last) if images and channels_last and x.ndim == 4 else x
            if isinstance(x, (list, tuple)):
                return type(x)(move(v, images) for v in x)
            if isinstance(x, dict):
                return {k: move(v, False) for k, v in x.items()}
            return x

        return Batch(move(self.inputs, True), move(self.targets, False), self.indices, self.bad)


def _images(good: list[tuple[Any, Any, int]]) -> Any:
    """The good samples' images: stacked, or (`--decode gpu`: `Encoded` items) a list for the device."""
    if not good:
        return None
    return torch.stack([b[0] for b in good]) if isinstance(good[0][0], torch.Tensor) else [b[0] for b in good]


def collate_multi_label(items: list[tuple[Any, tuple[int, ...], int]], num_classes: int) -> Batch:
    """`collate` for several classes per image: the targets a (N, classes) multi-hot float tensor."""
    good = [b for b in items if b[0] is not None]
    images = _images(good)
    targets = torch.zeros(len(good), num_classes)
    for row, b in enumerate(good):
        targets[row, list(b[1])] = 1.0
    return Batch(images, targets, [b[2] for b in good], [b[2] for b in items if b[0] is None])


def collate(items: list[tuple[Any, int, int]]) -> Batch:
    """Stack the good (image, class, index) samples; the indices of unreadable ones go to `bad`."""
    good = [b for b in items if b[0] is not None]
    images = _images(good)
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    return Batch(images, targets, [b[2] for b in good], [b[2] for b in items if b[0] is None])
