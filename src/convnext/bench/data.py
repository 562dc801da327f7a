"""`convnext bench --mode data --data SRC[,SRC...]`: the input pipeline alone (read, decode, the training
augmentation, collate) in img/s, per source and number of loader workers, so that a user sees whether the loader
or the model bounds a training step. Sources are timed interleaved (A B C A B C ...), medians reported, each
against the first source."""

from __future__ import annotations

import statistics
import time
from typing import Any


def _loader(data: str, workers: int, batch_size: int, input_size: int, seed: int = 0):
    from torch.utils.data import DataLoader

    from ..data import EpochSampler, ImageFolder, collate, split_folder, train_transform
    from ..data.sources import kind, open_split

    augment = train_transform(input_size)
    if kind(data) == "folder":
        ds = ImageFolder(split_folder(data, "train"), augment, seed=seed)
    else:
        ds = open_split(data, "train", augment, seed=seed)
    sampler = EpochSampler(len(ds), shuffle=True, seed=seed)
    return ds, DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0, drop_last=True)


def _time(loader, batches: int) -> float:
    """img/s over `batches` batches (after one batch of warm-up, which starts the workers)."""
    it = iter(loader)
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it, None)
        if b is None:
            break
        n += len(b.targets)
    return n / (time.perf_counter() - t0)


def bench_data(sources: list[str], workers: list[int], *, batch_size: int = 32, input_size: int = 224,
               batches: int = 10, repeats: int = 3, progress: bool = True) -> dict[str, Any]:
    """{"rows": [{source, workers, img_s, ratio}], ...}; each (source, workers) timed `repeats` times, interleaved."""
    import torch

    from ..utils import machine_line

    if not sources or not workers or min(workers) < 0 or batch_size < 1 or batches < 1 or repeats < 1:
        raise ValueError("--data needs at least one source; --workers N[,N...] >= 0; --batch-size, --repeats >= 1")
    loaders = {(s, w): _loader(s, w, batch_size, input_size) for s in sources for w in workers}
    for (s, _), (ds, _) in loaders.items():
        if len(ds) < batch_size * (batches + 1):
            raise ValueError(f"{s} has {len(ds)} training images: fewer than --batch-size x ({batches} + 1) to time")
    times: dict[tuple[str, int], list[float]] = {k: [] for k in loaders}
    for r in range(repeats):
        for k, (_, loader) in loaders.items():
            loader.sampler.set_epoch(r)
            times[k].append(_time(loader, batches))
            if progress:
                print(f"  round {r + 1}/{repeats}: {k[0]} workers {k[1]}: {times[k][-1]:.0f} img/s", flush=True)
    rows = []
    for (s, w), t in times.items():
        base = statistics.median(times[(sources[0], w)])
        rows.append({"source": s, "workers": w, "img_s": statistics.median(t), "ratio": statistics.median(t) / base})
    return {"rows": rows, "batch_size": batch_size, "input_size": input_size, "batches": batches, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "machine": machine_line()}


def format_data_table(res: dict[str, Any]) -> str:
    lines = [f"input pipeline (read + decode + train augmentation at {res['input_size']} px + collate), batch "
             f"{res['batch_size']}, median of {res['repeats']} x {res['batches']} batches {res['machine']}",
             f"{'source':<48} {'workers':>7} {'img/s':>8} {'vs first':>8}"]
    lines += [f"{r['source'][-48:]:<48} {r['workers']:>7} {r['img_s']:>8.0f} {r['ratio']:>7.2f}x" for r in res["rows"]]
    return "\n".join(lines)
