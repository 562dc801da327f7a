"""Published ConvNeXt weights, keyed `arch.tag` as in timm, with their preprocessing and licence.

`sha256` is a full hash where one is published and the hash prefix that torchvision and timm put
in their file names otherwise; official Meta files publish none (the first download's hash is
recorded and then enforced, see `io.download`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..preprocess import Preprocess

_FB = "https://dl.fbaipublicfiles.com/convnext"
_TV = "https://download.pytorch.org/models"
_AT_384 = Preprocess(input_size=384, crop_pct=1.0)  # official 384 fine-tunes: resize to the square, no crop
_TIMM = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights"


@dataclass(frozen=True)
class PretrainedWeights:
    url: str
    num_classes: int  # 21841 for ImageNet-22K, 0 for FCMAE pre-training (no classifier)
    preprocess: Preprocess = field(default_factory=Preprocess)  # eval resize, crop, mean/std
    license: str = "mit"
    sha256: str | None = None
    top1: float | None = None  # published ImageNet-1K top-1 at input_size
    key: str | None = None  # wrapper key inside the file, when not the default lookup

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def _table() -> dict[str, PretrainedWeights]:
    t: dict[str, PretrainedWeights] = {}
    # ConvNeXt V1, official (README): IN-1K, IN-22K, IN-22K -> IN-1K at 224 and 384.
    in1k = {"tiny": 82.1, "small": 83.1, "base": 83.8, "large": 84.3}
    ft22k = {"tiny": (82.9, 84.1), "small": (84.6, 85.8), "base": (85.8, 86.8), "large": (86.6, 87.5),
             "xlarge": (87.0, 87.8)}
    for s, top1 in in1k.items():
        t[f"convnext_{s}.fb_in1k"] = PretrainedWeights(f"{_FB}/convnext_{s}_1k_224_ema.pth", 1000, top1=top1)
    for s, top1 in {"base": 85.1, "large": 85.5}.items():
        t[f"convnext_{s}.fb_in1k_384"] = PretrainedWeights(
            f"{_FB}/convnext_{s}_1k_384.pth", 1000, preprocess=_AT_384, top1=top1)
    for s, (t224, t384) in ft22k.items():
        ema = "_ema" if s == "xlarge" else ""
        t[f"convnext_{s}.fb_in22k"] = PretrainedWeights(f"{_FB}/convnext_{s}_22k_224.pth", 21841)
        t[f"convnext_{s}.fb_in22k_ft_in1k"] = PretrainedWeights(
            f"{_FB}/convnext_{s}_22k_1k_224{ema}.pth", 1000, top1=t224)
        t[f"convnext_{s}.fb_in22k_ft_in1k_384"] = PretrainedWeights(
            f"{_FB}/convnext_{s}_22k_1k_384{ema}.pth", 1000, preprocess=_AT_384, top1=t384)
    for s, top1 in {"small": 78.7, "base": 82.0, "large": 82.6}.items():
        t[f"convnext_isotropic_{s}.fb_in1k"] = PretrainedWeights(
            f"{_FB}/convnext_iso_{s}_1k_224_ema.pth", 1000, top1=top1)
    # torchvision's own recipe (IN-1K); eval resize per variant, bilinear.
    tv = {"tiny": ("983f1562", 236, 82.520), "small": ("0c510722", 230, 83.616),
          "base": ("6075fbad", 232, 84.062), "large": ("ea097f82", 232, 84.414)}
    for s, (h, resize, top1) in tv.items():
        t[f"convnext_{s}.tv_in1k"] = PretrainedWeights(
            f"{_TV}/convnext_{s}-{h}.pth", 1000, preprocess=Preprocess(crop_pct=224 / resize, interpolation="bilinear"),
            license="bsd-3-clause", sha256=h, top1=top1)
    # timm's small V1 ConvNeXts (no official weights exist for these sizes).
    for s, (file, crop) in {"atto": ("convnext_atto_d2-01bb0f51", 0.875),
                            "femto": ("convnext_femto_d1-d71d5b4c", 0.875),
                            "pico": ("convnext_pico_d1-10ad7f0d", 0.875),
                            "nano": ("convnext_nano_d1h-7eb4bdea", 0.95)}.items():
        tag = {"atto": "d2_in1k", "nano": "d1h_in1k"}.get(s, "d1_in1k")
        t[f"convnext_{s}.{tag}"] = PretrainedWeights(
            f"{_TIMM}/{file}.pth", 1000, preprocess=Preprocess(crop_pct=crop), license="apache-2.0", sha256=file.rsplit("-", 1)[1])
    # ConvNeXt V2 (CC-BY-NC 4.0): FCMAE pre-training, IN-1K fine-tunes, IN-22K intermediate fine-tunes.
    v2_1k = {"atto": 76.7, "femto": 78.5, "pico": 80.3, "nano": 81.9, "tiny": 83.0, "base": 84.9,
             "large": 85.8, "huge": 86.3}
    v2_22k = {"nano": {224: 82.1, 384: 83.4}, "tiny": {224: 83.9, 384: 85.1}, "base": {224: 86.8, 384: 87.7},
              "large": {224: 87.3, 384: 88.2}, "huge": {384: 88.7, 512: 88.9}}
    v2 = dict(license="cc-by-nc-4.0")
    for s, top1 in v2_1k.items():
        t[f"convnextv2_{s}.fcmae"] = PretrainedWeights(
            f"{_FB}/convnextv2/pt_only/convnextv2_{s}_1k_224_fcmae.pt", 0, **v2)
        t[f"convnextv2_{s}.fcmae_ft_in1k"] = PretrainedWeights(
            f"{_FB}/convnextv2/im1k/convnextv2_{s}_1k_224_ema.pt", 1000, top1=top1, **v2)
    for s, results in v2_22k.items():
        for res, top1 in results.items():
            tag = "fcmae_ft_in22k_in1k" + ("" if res == 224 else f"_{res}")
            t[f"convnextv2_{s}.{tag}"] = PretrainedWeights(
                f"{_FB}/convnextv2/im22k/convnextv2_{s}_22k_{res}_ema.pt", 1000,
                preprocess=Preprocess(res, 0.875 if res == 224 else 1.0), top1=top1, **v2)
    return t


PRETRAINED: dict[str, PretrainedWeights] = _table()
