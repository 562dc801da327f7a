"""Model folders as the Hugging Face Hub holds them: timm's layout and transformers', read and written.

- `resolve("hf-hub:org/name[@revision]")`: the repo's snapshot folder, through `huggingface_hub` (with
  `HF_HUB_OFFLINE=1` from the local cache only, never a network call); `local-dir:DIR`: DIR (timm's names).
- `folder_spec(folder)`: what a Hub folder's `config.json` (and `preprocessor_config.json`) say of its model:
  our architecture name, class names and preprocessing (the spec of `weights.header`), for timm's layout
  (`architecture`, `label_names`, `pretrained_cfg`) and transformers' (`ConvNextConfig`/`ConvNextV2Config` with
  `id2label`, `ConvNextImageProcessor` settings).
- `write_timm_folder` / `write_transformers_folder`: the folders `timm.create_model("local-dir:DIR",
  pretrained=True)` and `AutoModelForImageClassification.from_pretrained(DIR)` load, with a model card.

The weight files in them are the owners' layouts (no header of ours): `read_model_file` reads a folder through
`folder_spec`, so one reader still reads everything we write.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from ..utils import read_json_object
from .io import CheckpointError

SOURCES = ("hf-hub:", "local-dir:")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}  # PIL's numbers, as ConvNextImageProcessor stores them


def is_hub_name(src: Any) -> bool:
    return isinstance(src, str) and src.startswith(SOURCES)


def resolve(src: str) -> Path:
    """`hf-hub:org/name[@rev]` -> its snapshot folder (downloaded, or from the cache); `local-dir:DIR` -> DIR."""
    if src.startswith("local-dir:"):
        folder = Path(src[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"{src}: no such folder")
        return folder
    repo, _, revision = src[len("hf-hub:"):].partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{src}: a Hub name is hf-hub:ORG/NAME (optionally @REVISION)")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CheckpointError(f"{src} needs huggingface_hub: pip install 'convnext[hub]'") from None
    # (read now, not when huggingface_hub was imported: a notebook or a test sets them after)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    cache = os.environ.get("HF_HUB_CACHE") or (os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME")
                                                else constants.HF_HUB_CACHE)
    patterns = ["config.json", "preprocessor_config.json", *WEIGHT_FILES, "README.md"]
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=patterns, cache_dir=cache,
                                      local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, not cached: one line saying how to fix it
        if not offline:
            try:
                return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True))
            except Exception:  # noqa: BLE001 - not cached either: the first error is the one to report
                pass
        raise CheckpointError(
            f"{src}: not in the local Hugging Face cache ({cache})"
            + (" and HF_HUB_OFFLINE=1 forbids downloading it" if offline else
               f" and the Hub could not be reached ({type(e).__name__})")
            + f"; fill the cache on a connected machine with `hf download {repo}` (then copy HF_HOME here), or "
              f"pass the folder as local-dir:DIR") from None


def weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: the folder holds none of {', '.join(WEIGHT_FILES)}")


def folder_spec(folder: Path) -> dict[str, Any]:
    """Our spec (`model_name`, `classes`, `preprocess`; whatever the folder says) of a Hub model folder."""
    cfg = read_json_object(folder / "config.json", CheckpointError)
    if cfg is None:
        return {}
    if "architecture" in cfg or "pretrained_cfg" in cfg:
        return _timm_spec(cfg, folder)
    if str(cfg.get("model_type", "")).startswith("convnext"):
        spec = {"classes": _id2label(cfg, folder)}
        pre = read_json_object(folder / "preprocessor_config.json", CheckpointError)
        if pre is not None:
            spec["preprocess"] = _processor_preprocess(pre, folder).to_dict()
        return {k: v for k, v in spec.items() if v is not None}
    raise CheckpointError(f"{folder / 'config.json'}: neither timm's layout (architecture) nor a transformers "
                          f"ConvNeXt (model_type {cfg.get('model_type')!r})")


def _timm_spec(cfg: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    from ..models import MODELS

    arch = str(cfg.get("architecture") or cfg.get("pretrained_cfg", {}).get("architecture", "")).split(".")[0]
    if arch not in MODELS:
        raise CheckpointError(f"{folder}: timm architecture {arch!r} is not a ConvNeXt this library builds")
    pc = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), Mapping) else cfg
    spec: dict[str, Any] = {"model_name": arch}
    names = cfg.get("label_names", pc.get("label_names"))
    if isinstance(names, Mapping):  # {id: name}: timm's form when ids have gaps
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{folder}: label_names has gaps (ids {ids[:5]}...): one name per class is needed")
        names = [names[str(i)] if str(i) in names else names[i] for i in ids]
    if names:
        spec["classes"] = [str(n) for n in names]
    try:
        size = pc.get("input_size", (3, 224, 224))
        spec["preprocess"] = Preprocess(
            input_size=int(size[-1]), crop_pct=float(pc.get("crop_pct", 0.875)),
            interpolation=str(pc.get("interpolation", "bicubic")), crop_mode=str(pc.get("crop_mode", "center")),
            mean=tuple(pc.get("mean", IMAGENET_MEAN)), std=tuple(pc.get("std", IMAGENET_STD))).to_dict()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: its pretrained_cfg is not a preprocessing we know ({e})") from None
    return spec


def _id2label(cfg: Mapping[str, Any], folder: Path) -> list[str] | None:
    labels = cfg.get("id2label")
    if not isinstance(labels, Mapping) or not labels:
        return None
    try:
        ids = sorted(int(k) for k in labels)
    except ValueError:
        raise CheckpointError(f"{folder / 'config.json'}: id2label keys are not class indices") from None
    if ids != list(range(len(ids))):
        raise CheckpointError(f"{folder / 'config.json'}: id2label has gaps (ids {ids[:5]}...)")
    return [str(labels[str(i)] if str(i) in labels else labels[i]) for i in ids]


def _processor_preprocess(pre: Mapping[str, Any], folder: Path) -> Preprocess:
    """`ConvNextImageProcessor` settings as our Preprocess: a shortest edge below 384 is resized to edge / crop_pct
    and center-cropped (ours "center"); from 384 up the image is resized to edge x edge, no crop (ours
    "squash", crop_pct 1)."""
    size = pre.get("size", {"shortest_edge": 224})
    edge = size if isinstance(size, int) else size.get("shortest_edge", size.get("height"))
    resample = {v: k for k, v in _RESAMPLE.items()}.get(int(pre.get("resample", 3)))
    if not isinstance(edge, int) or resample is None:
        raise CheckpointError(f"{folder / 'preprocessor_config.json'}: size {size!r} / resample {pre.get('resample')!r} "
                              f"is not a ConvNeXt preprocessing we know")
    mean, std = tuple(pre.get("image_mean", IMAGENET_MEAN)), tuple(pre.get("image_std", IMAGENET_STD))
    if edge >= 384:
        return Preprocess(input_size=edge, crop_pct=1.0, interpolation=resample, crop_mode="squash", mean=mean, std=std)
    return Preprocess(input_size=edge, crop_pct=float(pre.get("crop_pct", 224 / 256)), interpolation=resample,
                      mean=mean, std=std)


def _processor_config(pre: Preprocess) -> dict[str, Any]:
    """The `ConvNextImageProcessor` settings that compute `pre`, or an error where none does."""
    squash = pre.crop_mode == "squash" and pre.crop_pct == 1.0
    if not (squash if pre.input_size >= 384 else pre.crop_mode == "center"):
        raise ValueError(f"transformers' ConvNextImageProcessor cannot compute this model's preprocessing "
                         f"({pre.input_size} px, crop_mode {pre.crop_mode}, crop_pct {pre.crop_pct}): it crops below "
                         f"384 px and squashes without a crop from 384 up; export --format hub (timm's) instead")
    return {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": pre.input_size},
            "crop_pct": pre.crop_pct if not squash else 0.875, "resample": _RESAMPLE[pre.interpolation],
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean),
            "image_std": list(pre.std)}


def _save_weights(folder: Path, sd: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def write_timm_folder(folder: Path, sd: Mapping[str, torch.Tensor], model_name: str, cfg: Any,
                      classes: Sequence[str], pre: Preprocess, card: str) -> None:
    """timm's Hub layout (`timm.models._hub.save_for_hf`): config.json, model.safetensors (timm's keys), README.md."""
    from .convert import from_ours

    if not hasattr(cfg, "dims"):
        raise ValueError(f"{model_name} is isotropic: timm has no isotropic ConvNeXt to load it (export another format)")
    n = len(classes)
    config = {
        "architecture": model_name, "num_classes": n, "num_features": cfg.dims[-1], "global_pool": "avg",
        "label_names": list(classes),
        "pretrained_cfg": {"custom_load": False, "input_size": [3, pre.input_size, pre.input_size],
                           "fixed_input_size": False, "interpolation": pre.interpolation, "crop_pct": pre.crop_pct,
                           "crop_mode": pre.crop_mode, "mean": list(pre.mean), "std": list(pre.std), "num_classes": n,
                           "pool_size": [pre.input_size // 32] * 2, "first_conv": "stem.0", "classifier": "head.fc"},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    _save_weights(folder, from_ours(sd, "timm"))
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_transformers_folder(folder: Path, sd: Mapping[str, torch.Tensor], model_name: str, cfg: Any,
                              classes: Sequence[str], pre: Preprocess, card: str) -> None:
    """transformers' layout (`save_pretrained` of ConvNext(V2)ForImageClassification): config.json,
    preprocessor_config.json, model.safetensors (its keys), README.md."""
    from .convert import from_ours

    if not hasattr(cfg, "dims"):
        raise ValueError(f"{model_name} is isotropic: transformers has no isotropic ConvNeXt to load it")
    processor = _processor_config(pre)
    v2 = bool(cfg.use_grn)
    prefix, kind = ("convnextv2", "ConvNextV2") if v2 else ("convnext", "ConvNext")
    config = {
        "architectures": [f"{kind}ForImageClassification"], "model_type": prefix, "num_channels": cfg.in_chans,
        "patch_size": cfg.patch_size, "num_stages": len(cfg.dims), "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths), "hidden_act": "gelu", "initializer_range": 0.02, "layer_norm_eps": 1e-6,
        "drop_path_rate": 0.0, "image_size": pre.input_size,
        "id2label": {str(i): c for i, c in enumerate(classes)}, "label2id": {c: i for i, c in enumerate(classes)},
        "torch_dtype": "float32",
    }
    if not v2:
        config["layer_scale_init_value"] = 1e-6 if cfg.ls_init_value else 0.0
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    hf = from_ours(sd, "hf")
    _save_weights(folder, {(k if k.startswith("classifier.") else f"{prefix}.{k}"): v for k, v in hf.items()})
    (folder / "README.md").write_text(card, encoding="utf-8")


FOLDER_FILES = {"config.json", "preprocessor_config.json", *WEIGHT_FILES, "README.md", ".gitattributes"}


def write_folder(folder: str | os.PathLike, build, *, force: bool = False) -> Path:
    """`build(tmp)` fills a hidden sibling folder, which then replaces `folder` whole: a kill leaves the old folder
    or none, never half of one. An existing `folder` only with `force`, and only one holding nothing but a model
    folder's files (never a folder of the user's)."""
    import shutil
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the output {folder} is a file; a Hub model is a folder")
    if folder.is_dir() and any(folder.iterdir()):
        extra = sorted(p.name for p in folder.iterdir() if p.name not in FOLDER_FILES)
        if extra:
            raise ValueError(f"{folder} holds other files ({', '.join(extra[:3])}): not a model folder; choose "
                             f"another --output (nothing was removed)")
        if not force:
            raise ValueError(f"{folder} exists; pass --force to overwrite it, or choose another --output")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        build(tmp)
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def model_card(model_name: str, classes: Sequence[str], pre: Preprocess, *, library: str, license: str,
               details: Mapping[str, Any] | None = None, metrics: str | None = None) -> str:
    """README.md of a Hub folder: the front matter the Hub reads (library, licence, tags), then the model, its
    data and recipe (`details`), its metrics (a markdown table) and how to load it."""
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    crop = (f"resize to {pre.input_size}x{pre.input_size}" if pre.crop_mode == "squash" and pre.crop_pct == 1.0 else
            f"resize the shorter side to {int(pre.input_size / pre.crop_pct)} (crop_pct {pre.crop_pct}), center crop "
            f"{pre.input_size}")
    lines = ["---", "tags:", "- image-classification", f"- {library}", "- convnext", f"library_name: {library}",
             f"license: {license}", "pipeline_tag: image-classification", "---", f"# {model_name}", "",
             f"A ConvNeXt{' V2' if 'v2' in model_name else ''} image classifier ({len(classes)} classes), written by the "
             f"`convnext` library in the layout {library} loads.", "", "## Model details",
             f"- **Architecture:** {model_name}", f"- **Classes:** {shown}",
             f"- **Preprocessing:** {crop}, {pre.interpolation}, mean {list(pre.mean)}, std {list(pre.std)}"]
    lines += [f"- **{k}:** {v}" for k, v in (details or {}).items()]
    if metrics:
        lines += ["", "## Metrics", "", metrics]
    lines += ["", "## Usage", "", "```python"]
    if library == "timm":
        lines += ["import timm", 'model = timm.create_model("hf-hub:ORG/NAME", pretrained=True).eval()',
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)"]
    else:
        lines += ["from transformers import AutoImageProcessor, AutoModelForImageClassification",
                  'processor = AutoImageProcessor.from_pretrained("ORG/NAME")',
                  'model = AutoModelForImageClassification.from_pretrained("ORG/NAME")']
    lines += ["# or: convnext predict IMAGE --checkpoint hf-hub:ORG/NAME", "```", ""]
    return "\n".join(lines)


def push(folder: str | os.PathLike, repo: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, token: str | None = None) -> str:
    """`convnext push DIR ORG/NAME`: upload an exported Hub folder (config.json, weights, model card) to a model
    repo, created if missing; returns the commit's URL. The token: `token`, else huggingface_hub's (HF_TOKEN, or
    `hf auth login`)."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json); write one with `convnext export "
                              f"--format hub|transformers`")
    weight_file(folder)
    folder_spec(folder)  # a config we can read, or one clear error before anything is sent
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise CheckpointError(f"{repo}: a Hub repo is ORG/NAME")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise CheckpointError("convnext push needs huggingface_hub: pip install 'convnext[hub]'") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, revision=revision,
                                 allow_patterns=sorted(FOLDER_FILES - {".gitattributes"}),
                                 commit_message=message or f"Upload {folder.name} with convnext")
    except HfHubHTTPError as e:  # the Hub said no (a token, a permission, a name): exit 2, as bad input
        raise CheckpointError(f"pushing {folder} to {repo} failed: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - no network, a timeout: the machine's, exit 1
        raise ConnectionError(f"pushing {folder} to {repo} failed: {type(e).__name__}: {e}") from None
    return str(getattr(info, "commit_url", info))
