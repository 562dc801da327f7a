"""The ImageNet class lists as data (package files in `data/classes/`, from timm's `data/_info` tables):
ImageNet-1k (1000 WordNet ids in sorted order: the order of every published 1000-class checkpoint),
ImageNet-22k (21,841, sorted: the official ConvNeXt in22k heads), and the 200-class subsets of ImageNet-A
and ImageNet-R. Each line is `synset<TAB>WordNet lemmas`; a class's readable name is its first lemma.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .errors import DataError

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


def synsets_of_names(names: Sequence[str]) -> list[str] | None:
    """The synsets of ImageNet-1k's (or -22k's) classes named as people read them, in order ("tench, Tinca tinca"
    or "tench": transformers' `id2label`), or None when `names` are not those."""
    table = BY_SIZE.get(len(names))
    if table is None:
        return None
    rows = _read(table)
    first = [lemmas.split(",")[0].strip().lower() for lemmas in rows.values()]
    if any(str(n).split(",")[0].strip().lower() != f for n, f in zip(names, first, strict=True)):
        return None
    return list(rows)


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



# ---- the ILSVRC2012 devkit: validation ground truth --------------------------------------------------------

def val_filename(i: int) -> str:
    """The devkit's name of validation image `i` (1-based): `ILSVRC2012_val_00000001.JPEG`."""
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def devkit_labels(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(file name, synset, "FILE:LINE") for the 50,000 validation images, from the ILSVRC2012 devkit: its folder
    (`ILSVRC2012_devkit_t12/`), its archive (`ILSVRC2012_devkit_t12.tar.gz`), or its
    `data/ILSVRC2012_validation_ground_truth.txt` (ILSVRC2012_IDs, mapped to synsets by `data/meta.mat` beside it,
    as torchvision's `parse_devkit_archive`); also a text file of one synset per line (line i: image i)."""
    path = Path(path)
    if path.is_dir():
        path = path / "data" / "ILSVRC2012_validation_ground_truth.txt"
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return _devkit_archive(path)
    if not path.is_file():
        raise DataError(f"devkit ground truth not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if lines and all(s.startswith("n") and s[1:].isdigit() for s in lines if s):  # synsets already
        return [(val_filename(i), s, f"{path}:{i}") for i, s in enumerate(lines, 1) if s]
    meta = path.with_name("meta.mat")
    if not meta.is_file():
        raise DataError(f"{path}: ILSVRC2012_IDs need the devkit's meta.mat beside it ({meta} is missing)")
    return _ids_to_synsets(lines, _meta_mat(meta.read_bytes(), meta), path)


def _devkit_archive(path: Path) -> list[tuple[str, str, str]]:
    import tarfile

    try:
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            need = ("meta.mat", "ILSVRC2012_validation_ground_truth.txt")
            if any(n not in members for n in need):
                raise DataError(f"{path} is not the ILSVRC2012 devkit: it lacks {' or '.join(need)}")
            meta, truth = (tar.extractfile(members[n]).read() for n in need)  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"cannot read the devkit archive {path}: {e}") from None
    return _ids_to_synsets(truth.decode().splitlines(), _meta_mat(meta, path), path)


def _meta_mat(data: bytes, where: object) -> dict[int, str]:
    """ILSVRC2012_ID -> synset of the 1000 leaf classes in the devkit's meta.mat (torchvision's parse_meta_mat)."""
    import io

    try:
        import scipy.io
    except ImportError:
        raise DataError("reading the devkit's meta.mat needs scipy: pip install 'convnext[imagenet]'") from None
    try:
        rows = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        table = {int(r[0]): str(r[1]) for r in rows if int(r[4]) == 0}  # ILSVRC2012_ID, WNID, ..., num_children
    except Exception as e:  # noqa: BLE001 - any damage to the file is one message
        raise DataError(f"{where}: not the devkit's meta.mat ({type(e).__name__}: {e})") from None
    if len(table) != 1000:
        raise DataError(f"{where}: meta.mat lists {len(table)} leaf synsets, not ImageNet-1k's 1000")
    return table


def _ids_to_synsets(lines: list[str], table: dict[int, str], where: object) -> list[tuple[str, str, str]]:
    out = []
    for i, line in enumerate((s.strip() for s in lines if s.strip()), 1):
        if not line.isdigit() or int(line) not in table:
            raise DataError(f"{where}:{i}: {line!r} is not an ILSVRC2012_ID (1 .. 1000)")
        out.append((val_filename(i), table[int(line)], f"{where}:{i}"))
    return out


# ---- ReaL ("Are we done with ImageNet?", Beyer et al. 2020) ------------------------------------------------

def read_real_labels(path: str | os.PathLike) -> dict[str, list[int]]:
    """The ReaL labels as published (`real.json`: a list, entry i the ImageNet-1k indices correct for validation
    image i + 1; an empty list: no label) or a JSON object keyed by file name, as file name -> indices
    (timm's `RealLabelsImagenet` keying)."""
    import json

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"ReaL labels file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a JSON file ({e})") from None
    items = enumerate(raw, 1) if isinstance(raw, list) else raw.items() if isinstance(raw, dict) else None
    if items is None:
        raise DataError(f"{path}: expected a list (the published real.json) or an object keyed by file name")
    out = {}
    for key, labels in items:
        name = val_filename(key) if isinstance(key, int) else os.path.basename(str(key))
        if not (isinstance(labels, list) and all(isinstance(v, int) and 0 <= v < 1000 for v in labels)):
            raise DataError(f"{path}: the labels of {name} must be a list of ImageNet-1k indices, got {labels!r}")
        out[name] = labels
    return out


# ---- ImageNet-C (Hendrycks & Dietterich, ICLR 2019) -------------------------------------------------------

# AlexNet's top-1 error per corruption, averaged over the 5 severities (hendrycks/robustness): the mCE normaliser.
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640, "defocus_blur": 0.819880,
    "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572,
    "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
SEVERITIES = ("1", "2", "3", "4", "5")


def corruption_folders(root: str | os.PathLike, classes: Sequence[str] = ()) -> list[tuple[str, str, Path]] | None:
    """(corruption, severity, folder of synset folders) when `root` is ImageNet-C (`<corruption>/<1..5>/<synset>/`,
    also with the release's category level, `noise/gaussian_noise/1/...`), else None (also when a top folder is
    one of `classes`: class folders with sub-folders named 1 .. 5 are not ImageNet-C)."""
    root = Path(root)

    def subdirs(p: Path) -> list[Path]:
        return sorted(e for e in p.iterdir() if e.is_dir() and not e.name.startswith("."))

    def severities(p: Path) -> list[Path]:
        found = subdirs(p)
        return found if found and all(s.name in SEVERITIES and subdirs(s) for s in found) else []

    known = set(classes)
    out = []
    for top in subdirs(root):
        if top.name in known:
            return None
        if severities(top):
            out += [(top.name, s.name, s) for s in severities(top)]
        else:
            inner = [c for c in subdirs(top) if severities(c)]
            if not inner:
                return None  # a folder that is neither: not ImageNet-C (e.g. a class folder)
            out += [(c.name, s.name, s) for c in inner for s in severities(c)]
    return out or None


def mean_corruption_error(top1_err: dict[str, dict[str, float]]) -> tuple[float | None, list[str]]:
    """mCE (%) from top-1 errors (fractions) per corruption and severity: the mean over corruptions of
    mean-over-severities error / AlexNet's (Hendrycks & Dietterich); the corruptions AlexNet has errors for, with
    the list of those used. None when no corruption has an AlexNet error."""
    used = sorted(c for c in top1_err if c in ALEXNET_ERR)
    if not used:
        return None, []
    ces = [sum(top1_err[c].values()) / len(top1_err[c]) / ALEXNET_ERR[c] for c in used]
    return 100.0 * sum(ces) / len(ces), used
