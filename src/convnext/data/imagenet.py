"""The ImageNet class lists as data (package files in `data/classes/`, from timm's `data/_info` tables):
ImageNet-1k (1000 WordNet ids in sorted order: the order of every published 1000-class checkpoint),
ImageNet-22k (21,841, sorted: the official ConvNeXt in22k heads), and the 200-class subsets of ImageNet-A
and ImageNet-R. Each line is `synset<TAB>WordNet lemmas`; a class's readable name is its first lemma.
"""

from __future__ import annotations

import functools
from importlib import resources

TABLES = {"imagenet-1k": "imagenet1k.tsv", "imagenet-22k": "imagenet22k.tsv", "imagenet-a": "imagenet-a.tsv",
          "imagenet-r": "imagenet-r.tsv"}
BY_SIZE = {1000: "imagenet-1k", 21841: "imagenet-22k"}


@functools.cache
def synsets(table: str) -> tuple[str, ...]:
    """The WordNet ids of one of `TABLES`, in the order of its classifier's outputs."""
    return tuple(_read(table))


@functools.cache
def _read(table: str) -> dict[str, str]:
    if table not in TABLES:
        raise ValueError(f"unknown class list {table!r}; known: {', '.join(TABLES)}")
    text = resources.files("convnext").joinpath("data", "classes", TABLES[table]).read_text(encoding="utf-8")
    return dict(line.split("\t", 1) for line in text.splitlines() if line)


def default_classes(num_classes: int) -> list[str]:
    """The class ids of a checkpoint without class names of its own: the ImageNet-1k or -22k synsets for
    1000 or 21,841 outputs, else "0" .. "N-1"."""
    if num_classes in BY_SIZE:
        return list(synsets(BY_SIZE[num_classes]))
    return [str(i) for i in range(num_classes)]


@functools.cache
def _names() -> dict[str, str]:
    out: dict[str, str] = {}
    for table in ("imagenet-22k", "imagenet-1k"):
        out.update({s: lemmas.split(",")[0].strip() for s, lemmas in _read(table).items()})
    return out


def display_name(cls: str) -> str:
    """A class id as people read it: an ImageNet synset's first lemma (`n01440764` -> `tench`), any other
    class name as it is."""
    return _names().get(cls, cls)

