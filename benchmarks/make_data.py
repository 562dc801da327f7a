"""The images of the input-pipeline table in benchmarks/README.md, cut from the package photos (no download).

`python benchmarks/make_data.py DIR` writes DIR/folder (660 JPEGs, 500 x 375, quality 90, 4 classes) packed as
DIR/wds (shards) and DIR/hf (a `save_to_disk` dataset) with `convnext data pack`, and DIR/large (360 JPEGs of
1600 x 1200: where `--decode cpu-draft` pays). An existing DIR is left as it is.
"""

import random
import subprocess
import sys
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[1] / "src" / "convnext" / "data" / "photos"


def write(root: Path, counts: dict[str, int], size: tuple[int, int], seed: int, crop: bool) -> None:
    rng = random.Random(seed)
    photos = [Image.open(f).convert("RGB") for f in sorted(PHOTOS.glob("*.jpg"))]
    for split, n in counts.items():
        for c in range(4):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n // 4):
                p = rng.choice(photos)
                if crop:  # a random window, as a dataset's different pictures
                    s = rng.uniform(0.5, 1.0)
                    w, h = int(p.width * s), int(p.height * s)
                    x, y = rng.randint(0, p.width - w), rng.randint(0, p.height - h)
                    p = p.crop((x, y, x + w, y + h))
                img = p.resize(size, Image.BICUBIC)
                (img if crop else img.rotate(rng.uniform(-10, 10))).save(folder / f"{i}.jpg", quality=90)


def main(out: str) -> None:
    root = Path(out)
    if root.exists():
        print(f"{root} exists: left as it is")
        return
    write(root / "folder", {"train": 640, "val": 20}, (500, 375), 0, crop=True)
    write(root / "large", {"train": 352, "val": 8}, (1600, 1200), 1, crop=False)
    bin_dir = Path(sys.executable).parent
    for fmt, extra in (("wds", ["--shard-size", "20MB"]), ("hf", [])):
        subprocess.run([str(bin_dir / "convnext"), "data", "pack", str(root / "folder"), str(root / fmt), "--format",
                        fmt, *extra], check=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/benchdata")
