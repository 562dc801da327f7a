"""`fit`: the ConvNeXt training recipe end to end, resumable to the bit from any checkpoint.

setup (data, model, optimizer, EMA, resume) -> for each epoch: train steps (per-step lr, mixup,
autocast, accumulation, clipping, EMA, mid-epoch checkpoints) -> evaluate -> metrics, plots,
best weights, checkpoint. All randomness is seeded from (seed, epoch, batch / sample index), never
from process-global state that a restart would lose.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import (DataError, EpochSampler, ImageFolder, ShardSampler, check_same_classes, collate,
                    eval_transform, load_rgb, mixup_cutmix, train_transform)
from ..eval.metrics import autocast, evaluate
from ..factory import create_model
from ..weights import save_checkpoint
from ..weights.io import atomic_write
from . import distributed as D
from .checkpoint import find_resume, load_state, save_state
from .config import TrainConfig, save_yaml
from .optim import build_optimizer
from .schedule import lr_at

logger = logging.getLogger(__name__)
STATE_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf under --nan-policy abort."""


@dataclass
class _Progress:
    epoch: int = 0  # epoch being trained
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done since the start of training
    loss_sum: float = 0.0
    loss_count: int = 0
    bad_images: int = 0
    nan_skipped: int = 0
    best_acc1: float = -1.0


def _step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return (((seed * 7_919 + epoch) * 1_000_003 + batch) * 65_537 + rank) % (2**63 - 1)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # loader workers must not fight the training threads for cores


def _loaders(cfg: TrainConfig, env: D.DistEnv):
    root = Path(cfg.data)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"{root / split} not found: --data must hold train/<class>/* and val/<class>/*")
    train = ImageFolder(root / "train", seed=cfg.seed, cache=cfg.cache_images, transform=train_transform(
        cfg.input_size, scale=cfg.scale, hflip=cfg.hflip, aa=cfg.aa, color_jitter=cfg.color_jitter,
        reprob=cfg.reprob, interpolation_name=cfg.train_interpolation))
    val = ImageFolder(root / "val", cache=cfg.cache_images, transform=eval_transform(cfg.input_size, crop_pct=cfg.crop_pct))
    check_same_classes(train, val)
    if len(train) < cfg.batch_size * env.world_size:
        raise DataError(f"{len(train)} training images are fewer than one batch ({cfg.batch_size} x "
                        f"{env.world_size} processes); lower --batch-size")
    common = dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=env.device.type == "cuda",
                  persistent_workers=cfg.workers > 0, worker_init_fn=_worker_init if cfg.workers > 0 else None)
    sampler = EpochSampler(len(train), shuffle=True, seed=cfg.seed, rank=env.rank, world_size=env.world_size)
    train_loader = DataLoader(train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val, batch_size=cfg.batch_size, sampler=ShardSampler(len(val), env.rank, env.world_size),
                            **common)
    return train, val, sampler, train_loader, val_loader


def _report_bad(dataset: ImageFolder, indices: list[int], policy: str, seen: set[int]) -> None:
    for i in indices:
        path = dataset.samples[i][0]
        try:
            load_rgb(path)
            reason = "failed to decode in a worker"
        except Exception as e:  # noqa: BLE001
            reason = f"{type(e).__name__}: {e}"
        if policy == "error":
            raise DataError(f"unreadable image {path} ({reason}); use --bad-images skip to train without it")
        if i not in seen:
            seen.add(i)
            logger.warning("skipping unreadable image %s (%s)", path, reason)


def _write_metrics(history: list[dict], output: Path) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(output / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the last metrics line plus the best top-1 and output folder."""
    env = D.setup(cfg.device)  # (the config validated itself, the model name included)
    try:
        return _fit(cfg, env)
    finally:
        D.cleanup(env)


def _fit(cfg: TrainConfig, env: D.DistEnv) -> dict[str, Any]:
    device, out = env.device, Path(cfg.output)
    if cfg.precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 has no fast CPU path (and no GradScaler there); use bf16 on CPU")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.threads or max(1, cores // env.world_size - cfg.workers))
    if not env.is_main:
        logging.getLogger("convnext").setLevel(logging.WARNING)
    train_ds, val_ds, sampler, train_loader, val_loader = _loaders(cfg, env)
    classes = train_ds.classes

    torch.manual_seed(cfg.seed)  # the initial weights (and head re-initialisation) depend on the seed only
    random.seed(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.finetune or False, num_classes=len(classes),
                         drop_path_rate=cfg.drop_path, head_init_scale=cfg.head_init_scale).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model
    if cfg.fsdp:
        if not env.distributed:
            raise ValueError("--fsdp shards across processes: run under torchrun or with --nproc N (N >= 2)")
        if cfg.model_ema:
            raise ValueError("--model-ema is not supported with --fsdp yet; use DDP (no --fsdp) for EMA runs")
        from torch.distributed.fsdp import fully_shard

        for unit in getattr(raw, "stages", None) or raw.blocks:  # one FSDP unit per stage (per block: isotropic)
            fully_shard(unit)
        fully_shard(raw)
    ema = None
    if cfg.model_ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(cfg.model_ema_decay), use_buffers=True)
    effective_batch = cfg.batch_size * cfg.grad_accum * env.world_size
    peak_lr = cfg.lr if cfg.lr is not None else cfg.lr_base * effective_batch / cfg.lr_base_batch
    optimizer = build_optimizer(raw, lr=peak_lr, weight_decay=cfg.weight_decay, betas=cfg.opt_betas, eps=cfg.opt_eps,
                                layer_decay=cfg.layer_decay, layer_decay_type=cfg.layer_decay_type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    if env.distributed and not cfg.fsdp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    batches_per_epoch = len(train_loader)
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise DataError(f"one epoch has {batches_per_epoch} batches, fewer than --grad-accum {cfg.grad_accum}")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    mix = mixup_cutmix(len(classes), mixup=cfg.mixup, cutmix=cfg.cutmix, switch_prob=cfg.mixup_switch_prob,
                       prob=cfg.mixup_prob)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)  # soft (mixed) targets too

    prog, history = _Progress(), []
    resumed = None
    resume = cfg.resume
    if resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # torchrun --max-restarts restarted us: continue from the last complete checkpoint
    if resume == "auto":
        resumed = find_resume(out)
        if resumed is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", out)
    elif resume:
        resumed = (Path(resume), load_state(resume))
    if resumed is not None:
        path, state = resumed
        if state["model_name"] != cfg.model or list(state["classes"]) != classes:
            raise ValueError(f"{path} was trained as {state['model_name']} on {len(state['classes'])} classes; "
                             f"this run is {cfg.model} on {len(classes)}: use another --output")
        # Full, parameter-name-keyed states: the same file resumes with or without FSDP, on any world size.
        set_model_state_dict(raw, state["model"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        if ema is not None and state.get("model_ema") is not None:
            ema.load_state_dict(state["model_ema"])
        scaler.load_state_dict(state["scaler"])
        prog = _Progress(**state["progress"])
        history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        logger.info("resumed from %s (epoch %d, batch %d, step %d)", path, prog.epoch + 1, prog.batch, prog.step)

    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        logger.info("%s: %d train / %d val images, %d classes; global batch %d (%d x %d x %d processes), "
                    "peak lr %.3g, %d steps (%d warmup), %s on %s", cfg.model, len(train_ds), len(val_ds),
                    len(classes), effective_batch, cfg.batch_size, cfg.grad_accum, env.world_size, peak_lr,
                    total_steps, warmup_steps, cfg.precision, device)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state() -> dict[str, torch.Tensor]:
        """Unsharded weights (collective under FSDP: every rank calls, rank 0 receives them)."""
        return get_model_state_dict(raw, options=full)

    def checkpoint() -> None:
        finite = all(bool(torch.isfinite(p.full_tensor() if hasattr(p, "full_tensor") else p).all())
                     for p in raw.parameters())
        if not finite:
            raise NonFiniteLossError(f"parameters are not finite at step {prog.step}; no checkpoint written")
        # Full (unsharded, FQN-keyed under FSDP) state: loadable by any number of processes.
        model_sd = model_state()
        optim_sd = get_optimizer_state_dict(raw, optimizer, options=full)
        if env.is_main:
            save_state(out, {
                "version": STATE_VERSION, "model_name": cfg.model, "classes": classes, "config": cfg.to_dict(),
                "model": model_sd, "model_ema": ema.state_dict() if ema is not None else None,
                "optimizer": optim_sd, "scaler": scaler.state_dict(), "progress": vars(prog).copy(),
                "step": prog.step, "history": history,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            }, prog.step, keep=cfg.keep_checkpoints)
        D.barrier(env)

    seen_bad: set[int] = set()
    summary: dict[str, Any] = {}
    while prog.epoch < cfg.epochs:
        epoch = prog.epoch
        sampler.set_epoch(epoch, start=prog.batch * cfg.batch_size)
        model.train()
        t0, n_images = time.perf_counter(), 0
        bar = tqdm(total=batches_per_epoch, initial=prog.batch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and env.is_main), dynamic_ncols=True, leave=False)
        step_ok = True
        for images, targets, indices, bad in train_loader:
            b = prog.batch
            if bad:
                _report_bad(train_ds, bad, cfg.bad_images, seen_bad)
            first_micro = b % cfg.grad_accum == 0
            if first_micro:
                lr = lr_at(prog.step, base_lr=peak_lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps,
                           total_steps=total_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                step_ok = True
            torch.manual_seed(_step_seed(cfg.seed, epoch, b, env.rank))  # mixup and drop path
            loss, n_local, files = None, 0, []
            if images is not None:
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if mix is not None:
                    images, targets = mix(images, targets)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast(device, cfg.precision):
                    loss = criterion(model(images).float(), targets)
                n_local = len(targets)
                files = [train_ds.samples[i][0] for i in indices.tolist()]
            # One reduction per step: every rank learns whether any rank saw a non-finite loss (so all
            # take the same branch, no hang) and the global loss sum (so every rank's progress, and the
            # checkpoint rank 0 writes, hold the same numbers).
            bad_local = loss is not None and not bool(torch.isfinite(loss))
            stats = D.sum_all([float(bad_local), 0.0 if (loss is None or bad_local) else loss.item() * n_local,
                               float(n_local), float(len(bad))], env)
            prog.bad_images += int(stats[3])
            if stats[0] > 0:
                msg = (f"non-finite loss at epoch {epoch + 1}, step {prog.step}, batch {b}"
                       + (f" (files: {', '.join(files[:8])}{', ...' if len(files) > 8 else ''})" if bad_local else
                          " on another process"))
                if cfg.nan_policy == "abort":
                    raise NonFiniteLossError(msg + "; no checkpoint written. --nan-policy skip skips such steps")
                logger.warning("%s; skipping this step", msg)
                step_ok = False
            else:
                if loss is not None:
                    scaler.scale(loss / cfg.grad_accum).backward()
                prog.loss_sum += stats[1]
                prog.loss_count += int(stats[2])
                n_images += int(stats[2])
            prog.batch += 1
            bar.update(1)
            if prog.batch % cfg.grad_accum == 0:  # optimizer step boundary
                if step_ok:
                    if cfg.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update_parameters(raw)
                else:
                    prog.nan_skipped += 1
                optimizer.zero_grad(set_to_none=True)
                prog.step += 1
                if prog.step % cfg.log_every == 0 or prog.batch == batches_per_epoch:
                    dt = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{prog.loss_sum / max(prog.loss_count, 1):.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{n_images / max(dt, 1e-9):.0f}")
                if cfg.save_every_steps and prog.step % cfg.save_every_steps == 0:
                    checkpoint()
            if prog.batch >= steps_per_epoch * cfg.grad_accum:
                break  # the tail that cannot fill an optimizer step is left out, as drop_last
        bar.close()
        train_time = time.perf_counter() - t0

        line: dict[str, Any] = {"epoch": epoch + 1, "train_loss": prog.loss_sum / max(prog.loss_count, 1),
                                "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_scale"],
                                "step": prog.step, "train_time_s": round(train_time, 2),
                                "train_img_s": round(n_images / max(train_time, 1e-9), 1)}
        if prog.bad_images:
            line["bad_images"] = prog.bad_images
        if prog.nan_skipped:
            line["nan_skipped"] = prog.nan_skipped
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            res = evaluate(raw if env.distributed else model, val_loader, device, len(classes), precision=cfg.precision,
                           channels_last=cfg.channels_last, progress=cfg.progress and env.is_main,
                           lockstep=cfg.fsdp)
            line.update(val_loss=res["loss"], val_acc1=res["acc1"], val_acc5=res["acc5"])
            if ema is not None:
                res_ema = evaluate(ema.module, val_loader, device, len(classes), precision=cfg.precision,
                                   channels_last=cfg.channels_last)
                line["val_acc1_ema"] = res_ema["acc1"]
            if res["acc1"] > prog.best_acc1:
                prog.best_acc1 = res["acc1"]
                best_sd = model_state()
                if env.is_main:
                    _save_best(raw, best_sd, out / "best.safetensors", cfg, classes, epoch + 1, res["acc1"])
        history.append(line)
        prog.epoch, prog.batch = epoch + 1, 0
        prog.loss_sum, prog.loss_count, prog.bad_images, prog.nan_skipped = 0.0, 0, 0, 0
        if env.is_main:
            _write_metrics(history, out)
            from ..plots import plot_curves

            plot_curves(history, out / "curves.png")
            logger.info("epoch %d/%d  train_loss %.4f%s  lr %.2e  %.0f img/s  %.1f s%s", epoch + 1, cfg.epochs,
                        line["train_loss"],
                        (f"  val_loss {line['val_loss']:.4f}  acc1 {line['val_acc1']:.2f}  acc5 {line['val_acc5']:.2f}"
                         + (f"  acc1_ema {line['val_acc1_ema']:.2f}" if "val_acc1_ema" in line else ""))
                        if "val_acc1" in line else "", line["lr"], line["train_img_s"], train_time,
                        f"  ({line['bad_images']} unreadable images skipped)" if "bad_images" in line else "")
        checkpoint()
        summary = dict(line)
    summary.update(best_acc1=prog.best_acc1, output=str(out))
    return summary


def _save_best(model: nn.Module, state_dict: dict, path: Path, cfg: TrainConfig, classes: list[str], epoch: int,
               acc1: float) -> None:
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    save_checkpoint(model, path, state_dict=state_dict, extra_metadata={
        "classes": json.dumps(classes), "epoch": str(epoch), "val_acc1": f"{acc1:.4f}",
        "preprocess": json.dumps({"input_size": cfg.input_size, "crop_pct": cfg.crop_pct, "interpolation": "bicubic",
                                  "mean": IMAGENET_MEAN, "std": IMAGENET_STD}),
    })


__all__ = ["NonFiniteLossError", "fit"]
