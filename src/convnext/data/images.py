"""Robust image decoding: every common format and mode becomes an 8-bit RGB PIL image."""

from __future__ import annotations

import os

from PIL import Image, ImageOps

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB without the classic mistakes.

    16-/32-bit integer images are rescaled (PIL's plain convert clips them to white), images with
    alpha or palette transparency are composited on white (not on black garbage), CMYK uses PIL's
    conversion (Adobe-inverted JPEGs are already un-inverted by the decoder).
    """
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif im.mode == "F":
        lo, hi = im.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path: str | os.PathLike, exif: bool = True) -> Image.Image:
    """Open, apply EXIF orientation (unless `exif` is False: the published ImageNet protocols, as timm's and
    torchvision's loaders, read the pixels as stored), decode fully and convert to RGB.

    Raises OSError / PIL.UnidentifiedImageError / ValueError for unreadable or truncated files.
    """
    with Image.open(path) as im:
        return decode_opened(im, exif)


def decode_opened(im: Image.Image, exif: bool = True) -> Image.Image:
    """`load_rgb` of an image already opened (its header read; a `draft` mode set, if any)."""
    if exif:
        im = ImageOps.exif_transpose(im)  # a rotated phone photo must not train sideways
    im.load()  # decode now, so a truncated file fails here and not inside a transform
    return to_rgb(im)


def why_unreadable(path: str | os.PathLike) -> str:
    """Why an image that failed in a loader worker cannot be used (decoded again here, to say why)."""
    try:
        load_rgb(path)
        return "failed to decode in a worker"
    except Exception as e:  # noqa: BLE001 - any decoder failure is the reason we report
        return f"{type(e).__name__}: {e}"
