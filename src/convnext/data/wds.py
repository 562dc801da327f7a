"""WebDataset tar shards as a data source: `--data wds:DIR`.

A shard is a plain (uncompressed) tar whose members are grouped into samples by key, as the `webdataset`
library writes them: `<key>.jpg|.jpeg|.png|.webp` (the image) with `<key>.cls` (the class index as text) or
`<key>.json` (`{"label": ...}`). The split's shards are those `DIR/_info.json` lists (timm's layout:
`{"splits": {"train": {"filenames": [...], "num_samples": N}}}`, brace patterns allowed, plus our optional
`"classes"`), else the `*.tar` files whose names contain the split's name (`imagenet-train-0000.tar`). A split
may also be named by its shards, as timm's (`--train-split 'imagenet-train-{0000..0146}.tar'`), and the source
itself may be a shard file or a brace pattern (`wds:/data/in1k-{train,validation}-{0000..0009}.tar`): its files
are then the splits' shards, found by name (all of them the training split's when none names a split).

The shards are indexed once (each member's byte offset and size, read from the tar headers), so that sample i
of a split is one `seek` + `read` away: the epoch sampler, the `(seed, epoch, index)` seeding, mid-epoch resume
and DDP are the folder's, exactly (every sample once per epoch, the same pad/drop rule), and the same images
in the same order train to bitwise the same weights as a folder. A member cut short by a truncated shard is an unreadable image (skipped and named, as a bad file); a shard that cannot be opened is an
error naming it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError
from .folder import ImageFolder, _label_lookup

PREFIX = "wds:"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
SPLIT_NAMES = {"validation": ("validation", "val", "valid"), "val": ("validation", "val", "valid")}
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then every extension


def is_wds(data: Any) -> bool:
    return isinstance(data, str) and data.startswith(PREFIX)


def _expand(pattern: str) -> list[str]:
    """`a-{000..003}.tar`, `a-{train,val}-{0..9}.tar`, nested `{train-{0..2},val-{0..1}}` -> their names, in order
    (the brace syntax of webdataset's braceexpand)."""
    start = pattern.find("{")
    depth, parts, mark = 0, [], start + 1
    for k in range(max(start, 0), len(pattern) if start >= 0 else 0):
        depth += {"{": 1, "}": -1}.get(pattern[k], 0)
        if depth == 1 and pattern[k] == ",":
            parts.append(pattern[mark:k])
            mark = k + 1
        if depth == 0:
            parts.append(pattern[mark:k])
            head, tail = pattern[:start], _expand(pattern[k + 1:])
            m = re.fullmatch(r"(\d+)\.\.(\d+)", parts[0]) if len(parts) == 1 else None
            if m:
                alts = [f"{i:0{len(m[1])}d}" for i in range(int(m[1]), int(m[2]) + 1)]
            elif len(parts) == 1:
                alts = ["{" + parts[0] + "}"]  # not a pattern: a name with braces
            else:
                alts = [a for part in parts for a in _expand(part)]
            return [head + a + t for a in alts for t in tail]
    return [pattern]


def read_info(root: Path) -> dict[str, Any]:
    from ..utils import read_json_object

    return read_json_object(root / "_info.json", DataError) or {}


def _is_pattern(text: str) -> bool:
    return text.endswith(".tar")


def source_shards(source: str) -> tuple[Path, list[Path] | None]:
    """(the folder of a `wds:` source, the shards it names when it is a file or a brace pattern, else None)."""
    path = Path(source)
    if not _is_pattern(source):
        return path, None
    shards = [path.parent / f for f in _expand(path.name)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"wds:{source}: {len(missing)} of its {len(shards)} shards are not there ({missing[0]})")
    return path.parent, shards


def split_shards(root: Path, split: str, named: list[Path] | None = None) -> list[Path]:
    """The shards of `split` under `root` (see the module doc). A split given as a shard file or brace pattern
    (timm's `--train-split 'imagenet-train-{0000..0146}.tar'`) is those files; `named` (a source that is a
    pattern): the split's shards among them, found by name, or all of them for train when none names a split."""
    if _is_pattern(split):
        return source_shards(str(root / split))[1]
    if not root.is_dir():
        raise DataError(f"wds:{root}: no such folder of shards")
    if named is not None:
        return _named_split(root, split, named)
    info, names = read_info(root), SPLIT_NAMES.get(split, (split,))
    splits = info.get("splits") if isinstance(info.get("splits"), dict) else {}
    for name in names:
        files = splits.get(name, {}).get("filenames") if isinstance(splits.get(name), dict) else None
        if files:
            shards = [root / f for pattern in files for f in _expand(str(pattern))]
            missing = [str(s) for s in shards if not s.is_file()]
            if missing:
                raise DataError(f"{root / '_info.json'} lists {missing[0]} for split {name!r}, which is not there")
            return shards
    tars = sorted(root.glob("*.tar"))
    found = _by_name(tars, names)
    if found:
        return found
    have = sorted(splits) or sorted({m[1] for t in tars if (m := re.search(r"(train|validation|val|test)", t.stem))})
    raise DataError(f"wds:{root} has no shards of split {split!r} (found: {', '.join(have) or 'no *.tar'}); "
                    f"choose one with --train-split / --val-split / --split")


def _by_name(tars: list[Path], names: tuple[str, ...]) -> list[Path]:
    for name in names:
        found = [t for t in tars if re.search(rf"(^|[-_.]){re.escape(name)}([-_.]|$)", t.stem)]
        if found:
            return found
    return []


def _named_split(root: Path, split: str, named: list[Path]) -> list[Path]:
    found = _by_name(named, SPLIT_NAMES.get(split, (split,)))
    if found:
        return found
    if split == "train" and not any(_by_name(named, (n,)) for n in ("train", "validation", "val", "valid", "test")):
        return named  # `wds:/data/shard-{000..099}.tar`: the training shards
    raise DataError(f"wds: the shards named ({named[0].name}, ...) hold no split {split!r}; name its shards with "
                    f"--{'val' if split in SPLIT_NAMES else 'train'}-split 'PATTERN.tar' (or --split for eval)")


def index_shard(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(the samples of one shard in tar order: key -> {ext: (offset, size)}, a note if the shard is cut short)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    note = None
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as e:  # a truncated or damaged shard: keep what came before
                    note = f"{path}: damaged after {len(samples)} samples ({e}); the rest of the shard is not read"
                    break
                if member is None:
                    break
                m = _KEY.match(member.name)
                if member.isfile() and m and not os.path.basename(member.name).startswith("_"):
                    samples.setdefault(m[1], {})[m[2].lower()] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable tar shard ({type(e).__name__}: {e})") from None
    return [{"key": k, "members": v} for k, v in samples.items()], note


def _label(raw: bytes, ext: str) -> list[str]:
    """The classes a sample's label member names: `.cls` text (`3`, or `1;4` for several), or `.json` (a class, a
    list of them, or an object with "label")."""
    if ext == "cls":
        return [p.strip() for p in raw.decode("utf-8").split(";") if p.strip()]
    value = json.loads(raw.decode("utf-8"))
    value = value.get("label", value.get("cls")) if isinstance(value, dict) else value
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in values):
        raise ValueError(f"no class in {raw[:60]!r}")
    return [str(v) for v in values]


class WdsImages(ImageFolder):
    """A split of WebDataset shards as an `ImageFolder` (items, caching, seeding and errors the same).
    `classes`: the training split's (at validation / eval); else `_info.json`'s "classes", else "0" .. max."""

    def __init__(self, source: str, split: str, transform: Callable | None = None,
                 classes: Sequence[str] | None = None, seed: int | None = 0, cache: bool = False,
                 exif: bool = True, image_key: str | None = None, label_key: str | None = None,
                 multi_label: bool = False) -> None:
        import logging

        # timm's --input-key / --target-key for shards: the members' extensions ("jpg;png", "cls")
        self.image_exts = tuple(image_key.lower().split(";")) if image_key else IMAGE_EXTS
        self.label_exts = tuple(label_key.lower().split(";")) if label_key else ("cls", "json")
        self.source = source[len(PREFIX):] if is_wds(source) else str(source)
        self.root, named = source_shards(self.source)
        self.split, self.exif = split, exif
        self.shards = split_shards(self.root, split, named)
        self.samples, labels = [], []
        for s, shard in enumerate(self.shards):
            found, note = index_shard(shard)
            if note:
                logging.getLogger(__name__).warning("%s", note)
            with open(shard, "rb") as f:
                for sample in found:
                    self._add(s, f, shard, sample, labels)
        if not self.samples:
            raise DataError(f"wds:{self.source} [{split}]: its shards hold no image (.{'|.'.join(self.image_exts)}) with "
                            f"a label (.{'|.'.join(self.label_exts)}); --image-key / --label-key name other members")
        several = next((i for i, v in enumerate(labels) if len(v) != 1), None)
        if several is not None and not multi_label:
            raise DataError(f"{self.sample_name(several)}: {len(labels[several])} classes; pass --multi-label to "
                            f"train on several classes per image")
        flat = [c for v in labels for c in v]
        info_classes = read_info(self.root).get("classes")
        own = list(classes) if classes is not None else (
            [str(c) for c in info_classes] if isinstance(info_classes, list) else _index_classes(flat, self.source))
        self.classes, lookup = own, _label_lookup(own)
        unknown = sorted(set(flat) - set(lookup))
        if unknown:
            raise DataError(f"wds:{self.source} [{split}]: label {unknown[0]!r} is not one of the {len(own)} classes "
                            f"({', '.join(own[:3])}, ...)")
        self._targets = [tuple(sorted({lookup[c] for c in v})) if multi_label else lookup[v[0]] for v in labels]
        self.transform, self.seed = transform, seed
        self.cache: dict[int, Any] | None = {} if cache else None
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def _add(self, s: int, f, shard: Path, sample: dict[str, Any], labels: list[str]) -> None:
        members = sample["members"]
        image = next((e for e in self.image_exts if e in members), None)
        label = next((e for e in self.label_exts if e in members), None)
        if image is None or label is None:
            return  # not an image sample (e.g. other modalities): not ours to read
        offset, size = members[label]
        f.seek(offset)
        try:
            labels.append(_label(f.read(size), "json" if label == "json" else "cls"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{shard}: {sample['key']}.{label} holds no class ({e})") from None
        self.samples.append((s, *members[image], sample["key"]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:  # open files stay in their process
        return {k: v for k, v in self.__dict__.items() if k != "_files"} | {"_files": {}}

    @property
    def targets(self) -> list[int]:
        return list(self._targets)

    def target(self, index: int) -> int:
        return self._targets[index]

    def shard_groups(self) -> list[list[int]]:
        """The sample indices of each shard (what `--sample-order shards` visits one shard at a time)."""
        groups: list[list[int]] = [[] for _ in self.shards]
        for i, (s, *_) in enumerate(self.samples):
            groups[s].append(i)
        return [g for g in groups if g]

    def read(self, index: int) -> bytes:
        s, offset, size, _ = self.samples[index]
        if self._pid != os.getpid():  # a forked loader worker: its own handles
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shards[s], "rb")  # noqa: SIM115 - kept open for the next reads
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{self.shards[s]}: the member is cut short ({len(data)} of {size} bytes)")
        return data

    def file(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.read(index))

    def sample_name(self, index: int) -> str:
        s, _, _, key = self.samples[index]
        return f"{self.shards[s]}:{key}"


def _index_classes(labels: list[str], source: str) -> list[str]:
    """Class indices as text -> "0" .. max (label i is class i); names -> their sorted distinct values."""
    if not all(v.isdigit() for v in labels):
        return sorted(set(labels))
    return [str(i) for i in range(max(int(v) for v in labels) + 1)]
