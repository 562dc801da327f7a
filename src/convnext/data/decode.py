"""Where training images are decoded: `--decode cpu|cpu-draft|gpu`.

- `cpu` (the default; what timm and the official code do): PIL decodes the whole image in a loader worker, then
  the train transform runs on it.
- `cpu-draft`: the random crop is drawn first, from the size in the JPEG's header (the same draws, in the same
  order, as `cpu`), and PIL's `draft` has libjpeg decode the JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling,
  most of the decoding work saved) whenever the crop, so reduced, still holds at least the output's pixels; the
  crop is then resized from the reduced image. An image it cannot reduce (not a JPEG, a crop too small to
  reduce, an EXIF rotation) is decoded as `cpu` decodes it, bitwise. Pixels differ from `cpu` by the
  downscaling only (a training-time augmentation; evaluation always decodes as `cpu`).
- `gpu`: loader workers only read the files' bytes (and their JPEG headers); each batch's JPEGs are decoded
  together on the CUDA device (`torchvision.io.decode_jpeg(device="cuda")`, nvJPEG) and cropped, flipped and
  augmented there by the same transform, each image seeded as in a worker (the same random draws as `cpu`).
  What nvJPEG should not decode (not a JPEG, CMYK, an EXIF rotation, a file without its end marker) is decoded
  by PIL in the worker and moved; an image nvJPEG fails on is decoded by PIL then, and is unreadable (skipped
  and named, as with `cpu`) only if PIL fails too. Pixels differ from `cpu` by the decoder's and the tensor
  resize's rounding (a level or two of 255).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from ..preprocess import DECODE_MODES
from .images import decode_opened

__all__ = ["DECODE_MODES", "DraftRandomResizedCrop", "Encoded", "Undecoded", "augment_on_device", "cuda_available"]
_ORIENTATION = 0x0112  # the EXIF tag


def cuda_available() -> bool:
    """Whether `--decode gpu` has a device to decode on."""
    return torch.cuda.is_available()


@dataclass
class Undecoded:
    """An image opened (its header read) but not decoded: `DraftRandomResizedCrop` decodes what its crop needs."""

    image: Image.Image
    exif: bool = True


@dataclass
class Encoded:
    """A sample for the device (`--decode gpu`): its JPEG bytes (decoded there), or its pixels when PIL had to
    decode it in the worker; and the seed of its augmentation (None: no randomness, as evaluation)."""

    jpeg: bytes | None
    pixels: torch.Tensor | None
    seed: int | None


def _needs_pil(im: Image.Image, exif: bool) -> bool:
    """What nvJPEG should not decode: not a baseline/progressive YCbCr or grey JPEG, or an EXIF rotation."""
    return im.format != "JPEG" or im.mode not in ("RGB", "L") or (exif and im.getexif().get(_ORIENTATION, 1) != 1)


def encode_for_device(file: str | os.PathLike | io.BytesIO, seed: int | None, exif: bool) -> Encoded:
    """In a loader worker: a sample's bytes when nvJPEG can decode them, else its pixels decoded by PIL."""
    from pathlib import Path

    data = file.getvalue() if isinstance(file, io.BytesIO) else Path(file).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if not _needs_pil(im, exif) and data.rstrip(b"\0")[-2:] == b"\xff\xd9":  # (a cut file lacks its end
            return Encoded(data, None, seed)                                   # marker: PIL says why it fails)
        return Encoded(None, v2.functional.pil_to_tensor(decode_opened(im, exif)), seed)


def draft_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) that leaves the crop at least the output's size."""
    return next((s for s in (8, 4, 2) if crop_h // s >= out_h and crop_w // s >= out_w), 1)


class DraftRandomResizedCrop(v2.RandomResizedCrop):
    """`v2.RandomResizedCrop` that takes an `Undecoded` JPEG and decodes it reduced when the crop allows it
    (`cpu-draft`, see the module doc); anything else exactly as `v2.RandomResizedCrop`."""

    def forward(self, *inputs: Any) -> Any:
        x = inputs[0] if len(inputs) == 1 else None
        if not isinstance(x, Undecoded):
            return super().forward(*inputs)
        im = x.image
        if im.format != "JPEG" or (x.exif and im.getexif().get(_ORIENTATION, 1) != 1):
            return super().forward(decode_opened(im, x.exif))  # (the crop drawn from the rotated size, as cpu)
        params = self.make_params([im])  # from the header's size: the draws `cpu` makes
        top, left, h, w = params["top"], params["left"], params["height"], params["width"]
        scale = draft_scale(h, w, *self.size)
        if scale == 1:
            return self.transform(decode_opened(im, x.exif), params)
        width, height = im.size
        im.draft("RGB", (-(-width // scale), -(-height // scale)))
        small = decode_opened(im, x.exif)
        fx, fy = width / small.width, height / small.height
        from torchvision.transforms.functional import pil_modes_mapping

        return small.resize((self.size[1], self.size[0]), pil_modes_mapping[self.interpolation],
                            box=(left / fx, top / fy, (left + w) / fx, (top + h) / fy))


def decode_on_device(items: list[Encoded], device: torch.device) -> list[torch.Tensor | None]:
    """The batch's images as uint8 (3, H, W) tensors on `device`: its JPEGs decoded together (nvJPEG on CUDA),
    the rest moved; None for one no decoder can read."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None if e.pixels is None else e.pixels.to(device, non_blocking=True)
                                      for e in items]
    todo = [k for k, e in enumerate(items) if e.jpeg is not None]
    if not todo:
        return out
    data = [torch.frombuffer(bytearray(items[k].jpeg), dtype=torch.uint8) for k in todo]
    with warnings.catch_warnings():  # (torchvision 0.29 points to TorchCodec for decoding; still the one here)
        warnings.simplefilter("ignore")
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the whole batch: one at a time, then PIL
            decoded = [_decode_one(d, device) for d in data]
    for k, img in zip(todo, decoded, strict=True):
        out[k] = img
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                return v2.functional.pil_to_tensor(decode_opened(im, False)).to(device)
        except Exception:  # noqa: BLE001 - any decoder failure: an unreadable image
            return None


def augment_on_device(items: list[Encoded], transform, device: torch.device) -> list[torch.Tensor | None]:
    """`decode_on_device`, then `transform` on each image where it lies, seeded from its `Encoded.seed` as a
    loader worker seeds it (the same random draws as `--decode cpu`)."""
    from torchvision import tv_tensors

    from ..utils import seeded

    images = []
    for e, img in zip(items, decode_on_device(items, device), strict=True):
        if img is not None:
            img = tv_tensors.Image(img)
            img = transform(img) if e.seed is None else seeded(transform, e.seed, img)
            img = img.as_subclass(torch.Tensor)
        images.append(img)
    return images
