"""`convnext bench --mode data --data SRC[,SRC...] [--decode cpu,cpu-draft,gpu]`: the input pipeline alone (read,
decode, the training augmentation, collate; with `gpu`, the decode and augmentation on the CUDA device too) in
img/s, per source, decode and number of loader workers, so that a user sees whether the loader or the model bounds
a training step. Candidates are timed interleaved (A B C A B C ...), medians reported, each against the first
source and decode."""

from __future__ import annotations

import statistics
import time
from typing import Any


def _loader(data: str, decode: str, workers: int, batch_size: int, input_size: int, seed: int = 0):
    from torch.utils.data import DataLoader

    from ..data import EpochSampler, ImageFolder, collate, split_folder, train_transform
    from ..data.folder import one_thread_worker
    from ..data.sources import kind, open_split

    augment = train_transform(input_size, draft=decode == "cpu-draft")
    if kind(data) == "folder":
        ds = ImageFolder(split_folder(data, "train"), augment, seed=seed)
    else:
        ds = open_split(data, "train", augment, seed=seed)
    ds.decode = decode
    sampler = EpochSampler(len(ds), shuffle=True, seed=seed)
    return ds, DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                          persistent_workers=workers > 0, drop_last=True, worker_init_fn=one_thread_worker)


def _time(loader, batches: int, device_augment=None) -> float:
    """img/s over `batches` batches (after one batch of warm-up, which starts the workers); `device_augment`
    (`--decode gpu`): each batch decoded and augmented on the CUDA device, synchronised."""
    import torch

    from ..data.decode import augment_on_device

    def finish(b) -> int:
        if device_augment is not None:
            augment_on_device(b.inputs, device_augment, torch.device("cuda"))
            torch.cuda.synchronize()
        return len(b.targets)

    it = iter(loader)
    finish(next(it))
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it, None)
        if b is None:
            break
        n += finish(b)
    return n / (time.perf_counter() - t0)


def bench_data(sources: list[str], workers: list[int], *, decodes: tuple[str, ...] = ("cpu",), batch_size: int = 32,
               input_size: int = 224, batches: int = 10, repeats: int = 3, threads: int | None = None,
               progress: bool = True) -> dict[str, Any]:
    """{"rows": [{source, decode, workers, img_s, ratio}], ...}; each (source, decode, workers) timed `repeats`
    times, interleaved; `ratio` against the first source and decode at the same workers; `threads`: torch's
    in this process (loader workers run 1 each, as in training)."""
    import torch

    from ..data import train_transform
    from ..data.decode import DECODE_MODES, cuda_available
    from ..utils import machine_line

    if not sources or not workers or min(workers) < 0 or batch_size < 1 or batches < 1 or repeats < 1:
        raise ValueError("--data needs at least one source; --workers N[,N...] >= 0; --batch-size, --repeats >= 1")
    bad = [d for d in decodes if d not in DECODE_MODES]
    if bad or not decodes or ("gpu" in decodes and not cuda_available()):
        raise ValueError(f"--decode takes {', '.join(DECODE_MODES)} (comma-separated; gpu needs a CUDA device), "
                         f"got {','.join(decodes)}")
    if threads:
        torch.set_num_threads(threads)
    loaders = {(s, d, w): _loader(s, d, w, batch_size, input_size) for s in sources for d in decodes for w in workers}
    for (s, _, _), (ds, _) in loaders.items():
        if len(ds) < batch_size * (batches + 1):
            raise ValueError(f"{s} has {len(ds)} training images: fewer than --batch-size x ({batches} + 1) to time")
    on_device = train_transform(input_size, tensors=True)
    times: dict[tuple[str, str, int], list[float]] = {k: [] for k in loaders}
    for r in range(repeats):
        for k, (_, loader) in loaders.items():
            loader.sampler.set_epoch(r)
            times[k].append(_time(loader, batches, on_device if k[1] == "gpu" else None))
            if progress:
                print(f"  round {r + 1}/{repeats}: {k[0]} decode {k[1]} workers {k[2]}: {times[k][-1]:.0f} img/s",
                      flush=True)
    rows = []
    for (s, d, w), t in times.items():
        base = statistics.median(times[(sources[0], decodes[0], w)])
        rows.append({"source": s, "decode": d, "workers": w, "img_s": statistics.median(t),
                     "ratio": statistics.median(t) / base})
    return {"rows": rows, "batch_size": batch_size, "input_size": input_size, "batches": batches, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "machine": machine_line()}


def format_data_table(res: dict[str, Any]) -> str:
    lines = [f"input pipeline (read + decode + train augmentation at {res['input_size']} px + collate), batch "
             f"{res['batch_size']}, median of {res['repeats']} x {res['batches']} batches {res['machine']}",
             f"{'source':<44} {'decode':>9} {'workers':>7} {'img/s':>8} {'vs first':>8}"]
    lines += [f"{r['source'][-44:]:<44} {r.get('decode', 'cpu'):>9} {r['workers']:>7} {r['img_s']:>8.0f} "
              f"{r['ratio']:>7.2f}x" for r in res["rows"]]
    return "\n".join(lines)
