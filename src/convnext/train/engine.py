"""The training engine: one loop for every task, resumable to the bit from any checkpoint.

`fit(task)` reads as its table of contents: set up (threads, data, model, optimizer, EMA,
wrappers) -> resume -> for each epoch: train (per-step lr, seeded randomness, autocast, named
losses, accumulation, clipping, NaN policy, EMA, mid-epoch checkpoints) -> evaluate -> end the
epoch (best weights, metrics.jsonl, curves.png, log, checkpoint). All randomness is seeded from
(seed, epoch, batch / sample index), never from process-global state that a restart would lose.
A task (`train.task.Task`) supplies only what differs: data, model, losses, metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import Batch, DataError, EpochSampler, ShardSampler
from ..data.folder import one_thread_worker
from ..models import fast
from ..models.optimize import NO_NATIVE_BF16, choose_training_forward, choose_training_precision, training_forward
from ..utils import atomic_write, autocast, native_low_precision, same_file
from ..weights.header import ModelFile, header
from .governor import ThreadGovernor
from . import distributed as D
from .checkpoint import OutputLock, earlier_run, find_resume, load_state, save_state
from .config import save_yaml
from .distributed import PeerLostError
from .schedule import lr_at, mmcv_lr_at
from .task import Task
from .tracking import StepWindow, Tracking, parse_log_to, write_summary_csv

logger = logging.getLogger(__name__)
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # unsharded, name-keyed: any world size loads it


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf under --nan-policy abort."""


class TooManyBadSamplesError(RuntimeError):
    """An epoch had no usable sample, or more unreadable ones than --max-bad-fraction allows."""


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # epoch being trained
    batch: int = 0  # micro-batches of this epoch already consumed
    step: int = 0  # optimizer steps done since the start of training
    loss_sums: dict[str, float] = field(default_factory=dict)  # this epoch, per named loss, summed over samples
    loss_count: int = 0  # samples in loss_sums
    bad_images: int = 0
    nan_skipped: int = 0
    best: float | None = None  # best value of the task's best_metric so far

    def next_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self.loss_sums, self.loss_count, self.bad_images, self.nan_skipped = {}, 0, 0, 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        d = dict(d)
        if "loss_sum" in d:  # version-1 checkpoints (classification only)
            d["loss_sums"] = {"loss": d.pop("loss_sum")} if d["loss_count"] else {}
            best = d.pop("best_acc1")
            d["best"] = None if best < 0 else best
        return cls(**d)


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the run's identity and config."""

    model: nn.Module  # the model itself (FSDP-sharded or not), never a DDP/compile wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    progress: Progress = field(default_factory=Progress)
    history: list[dict] = field(default_factory=list)  # one metrics line per finished epoch

    def model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded weights (collective under FSDP: every rank calls, rank 0 receives them)."""
        return get_model_state_dict(self.model, options=_FULL)

    def state_dict(self) -> dict[str, Any]:
        """The full training state: plain types and tensors only (loads with weights_only=True)."""
        return {"model": self.model_state(),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_FULL),
                "model_ema": self.ema.state_dict() if self.ema is not None else None,
                "scaler": self.scaler.state_dict(), "progress": asdict(self.progress), "step": self.progress.step,
                "history": self.history, "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=full)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=full)
        if self.ema is not None and state.get("model_ema") is not None:
            self.ema.load_state_dict(state["model_ema"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress.from_dict(state["progress"])
        self.history = list(state["history"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])


FUSED_DEPTHWISE_MIN_STEPS = 500


def fit(task: Task) -> dict[str, Any]:
    """Train `task` as its config says; returns the last metrics line, the best metric and the output folder.

    What it changes for the run (torch threads, the library's log level on ranks other than 0) is
    restored when it returns, also on error."""
    threads, log = torch.get_num_threads(), logging.getLogger("convnext")
    level = log.level
    env = D.setup(task.cfg.device)
    lock = OutputLock(task.cfg.output) if env.is_main else None
    try:
        if lock is not None:
            lock.acquire()
        trainer = Trainer(task, env)
        trainer.resume()
        try:
            while trainer.state.progress.epoch < task.cfg.epochs:
                line = trainer.train_epoch()
                line.update(trainer.evaluate_if_due())
                trainer.end_epoch(line)
        finally:
            trainer.tracking.close()
        return trainer.summary()
    except Exception as e:
        if env.distributed and D.is_communication_failure(e):  # name the node that went away
            raise D.PeerLostError(D.describe_failure(env, e)) from e
        raise
    finally:
        if lock is not None:
            lock.release()
        D.cleanup(env)
        torch.set_num_threads(threads)
        log.setLevel(level)


def _step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return (((seed * 7_919 + epoch) * 1_000_003 + batch) * 65_537 + rank) % (2**63 - 1)


class DeviceLoader:
    """A loader whose batches arrive on the device (what the engine hands `Task.evaluate`)."""

    def __init__(self, loader: DataLoader, to_device) -> None:
        self.loader, self.to_device, self.dataset = loader, to_device, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return (self.to_device(b) for b in self.loader)


class Trainer:
    """One training run of one task: built by `__init__`, driven by `fit`."""

    def __init__(self, task: Task, env: D.DistEnv) -> None:
        self.task, self.cfg, self.env = task, task.cfg, env
        self.out = Path(self.cfg.output)
        if self.cfg.precision == "fp16" and env.device.type == "cpu":
            raise ValueError("--precision fp16 has no fast CPU path (and no GradScaler there); use bf16 on CPU")
        full = self.cfg.threads or max(1, (os.cpu_count() or 1) // env.world_size - self.cfg.workers)
        torch.set_num_threads(full)
        # --threads auto (not given): fewer threads while another process shares the CPU (`train.governor`)
        self.governor = (ThreadGovernor(full) if self.cfg.threads is None and env.device.type == "cpu" and full > 1
                         else None)
        if not env.is_main:
            logging.getLogger("convnext").setLevel(logging.WARNING)
        self.found = self._find_checkpoint()  # read first: a bad --resume file fails before any work
        self._build_data()
        self.run = self.run_info()
        self.state = self._build_state()
        self._clear_earlier_run()  # (after the inputs, e.g. --finetune, are read)
        self.model = self.wrapped = self._wrap(self.state.model)
        # --compile: eager and compiled forward+backward are timed on the first batch, the faster is kept
        # (`optimize.choose_training_forward`); the checkpoint records the choice, a resume takes it as it is
        self.forward_record: dict[str, Any] | None = None
        # --precision auto: fp32 or bf16, measured on the first batch where the CPU has native bf16
        # (`_choose_precision`), recorded in the checkpoint as the forward's choice is
        self.precision_record: dict[str, Any] | None = None
        self.stand_in: Batch | None = None  # DDP: a rank whose batch came out empty backwards this one, weighted 0
        self.steps_per_epoch = len(self.train_loader) // self.cfg.grad_accum
        if self.steps_per_epoch < 1:
            raise DataError(f"one epoch has {len(self.train_loader)} batches, fewer than --grad-accum "
                            f"{self.cfg.grad_accum}")
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        self.warmup_steps = (round(self.cfg.warmup_epochs * self.steps_per_epoch) if self.cfg.warmup_iters is None
                             else min(self.cfg.warmup_iters, self.total_steps))
        self._fused_depthwise(self.cfg.precision)
        self.seen_bad: set[int] = set()
        self.tracking = Tracking([], self.out, {}, project=self.cfg.project)  # rank 0's trackers: `resume`
        self.window = StepWindow()

    # --- set-up -------------------------------------------------------------------------------
    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        self.train_ds, self.val_ds = self.task.datasets()
        if len(self.train_ds) < cfg.batch_size * env.world_size:
            raise DataError(f"{len(self.train_ds)} training samples are fewer than one batch ({cfg.batch_size} x "
                            f"{env.world_size} processes); lower --batch-size")
        common = dict(num_workers=cfg.workers, collate_fn=self.task.collate, pin_memory=env.device.type == "cuda",
                      persistent_workers=cfg.workers > 0, worker_init_fn=one_thread_worker if cfg.workers > 0 else None)
        self.sampler = EpochSampler(len(self.train_ds), shuffle=True, seed=cfg.seed, rank=env.rank,
                                    world_size=env.world_size, weights=self.task.sample_weights(self.train_ds),
                                    groups=self.task.sample_groups(self.train_ds))
        self.train_loader = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
                                       **common)
        self.val_loader = None if self.val_ds is None else DataLoader(
            self.val_ds, batch_size=cfg.batch_size, sampler=ShardSampler(len(self.val_ds), env.rank, env.world_size),
            **common)

    def _build_state(self) -> TrainState:
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # the initial weights (and head re-initialisation) depend on the seed only
        random.seed(cfg.seed)
        model = self.task.build_model().to(env.device)
        if env.distributed and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = D.sync_batchnorm(model, env.device)  # BatchNorm over the global batch (SyncBN)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.fsdp:
            self._shard(model)
        ema = None
        if cfg.model_ema:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.model_ema_decay), use_buffers=True)
        effective_batch = cfg.batch_size * cfg.grad_accum * env.world_size
        self.peak_lr = cfg.lr if cfg.lr is not None else cfg.lr_base * effective_batch / cfg.lr_base_batch
        groups = [{k: v for k, v in g.items() if k != "names"} for g in self.task.param_groups(model)]
        # The fused kernel: one pass over each parameter (demo-size steps 1.06x faster on CPU); DTensor
        # parameters (FSDP) take the default implementation.
        optimizer = torch.optim.AdamW(groups, lr=self.peak_lr, betas=cfg.opt_betas, eps=cfg.opt_eps,
                                      weight_decay=cfg.weight_decay, fused=not cfg.fsdp)
        scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        return TrainState(model, optimizer, scaler, ema)

    def _shard(self, model: nn.Module) -> None:
        """FSDP2: one unit per stage (per block for isotropic models), then the whole model."""
        if not self.env.distributed:
            raise ValueError("--fsdp shards across processes: run under torchrun or with --nproc N (N >= 2)")
        if self.cfg.model_ema:
            raise ValueError("--model-ema is not supported with --fsdp yet; use DDP (no --fsdp) for EMA runs")
        from torch.distributed.fsdp import fully_shard

        for unit in getattr(model, "stages", None) or getattr(model, "blocks", None) or []:
            fully_shard(unit)
        fully_shard(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        """What the training steps call: DDP around the model (unless sharded); --compile decides on the first
        batch (`_choose_forward`)."""
        if self.env.distributed and not self.cfg.fsdp:
            device = self.env.device
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model

    def _fused_depthwise(self, precision: str) -> None:
        # bf16 on CPU: the compiled depthwise backward pays its ~20 s of compiling back over a long run only
        # (decided from the plan, not from timings, so that a resumed run computes exactly as before)
        fast.use_fused_depthwise_backward(self.state.model, precision == "bf16" and self.env.device.type == "cpu"
                                          and self.total_steps >= FUSED_DEPTHWISE_MIN_STEPS)

    def _choose_precision(self, batch: Batch) -> None:
        """--precision auto: bf16 on a CUDA GPU that has it; on CPUs with native bf16 (AVX512-BF16, AMX) on every
        process, the faster of fp32 and bf16 forward+backward of this batch (as the run would compute it;
        nothing stepped, RNG, gradients and buffers restored; bf16 must win by 5%), all processes taking the
        majority's choice; else fp32."""
        device, env = self.env.device, self.env
        native = device.type == "cpu" and native_low_precision(torch.bfloat16)
        if device.type == "cuda" or D.sum_all([float(native)], env)[0] < env.world_size:
            record = (choose_training_precision(self.state.model, lambda p: None)[1] if device.type == "cuda" else
                      {"precision": "fp32", "reason": NO_NATIVE_BF16 + (" on every process" if env.distributed else "")})
        else:
            def fwd_bwd(precision: str) -> torch.Tensor:
                self._fused_depthwise(precision)
                with autocast(device, precision):
                    loss = self._named_losses(self.task.loss(self.wrapped, batch, device))["loss"]
                loss.backward()
                return loss

            _, record = choose_training_precision(self.state.model, fwd_bwd)
            votes = D.sum_all([float(record["precision"] == "bf16")], env)[0]
            record["precision"] = "bf16" if 2 * votes > env.world_size else "fp32"
        self._use_precision(record)
        t = record.get("timings_ms")
        logger.info("--precision auto: %s (%s)", record["precision"], record.get("reason") if t is None else
                    f"forward+backward {t['fp32']:.0f} ms fp32, {t['bf16']:.0f} ms bf16")

    def _use_precision(self, record: dict[str, Any]) -> None:
        if record.get("precision") not in ("fp32", "bf16"):
            raise ValueError(f"the checkpoint's --precision auto record names {record.get('precision')!r}")
        self.precision_record = record
        self.cfg = self.task.cfg = dataclasses.replace(self.cfg, precision=record["precision"])
        self._fused_depthwise(record["precision"])

    def _choose_forward(self, batch: Batch) -> None:
        """--compile: time eager and compiled forward+backward of this batch (nothing stepped, RNG, gradients
        and buffers restored), keep the faster; all processes take the choice of the majority."""
        cfg, device = self.cfg, self.env.device

        def fwd_bwd(forward) -> torch.Tensor:
            with autocast(device, cfg.precision):
                loss = self._named_losses(self.task.loss(forward, batch, device))["loss"]
            self.state.scaler.scale(loss).backward()
            return loss

        _, record = choose_training_forward(self.wrapped, fwd_bwd)
        votes = D.sum_all([float(record["how"] == "compiled")], self.env)[0]
        record["how"] = "compiled" if 2 * votes > self.env.world_size else "eager"
        self._use_forward(record)
        t = record["timings_ms"]
        logger.info("--compile: %s forward (forward+backward %.0f ms eager, %.0f ms compiled; compiling took %.1f s)",
                    record["how"], t["eager"], t["compiled"], record["compile_s"])

    def _use_forward(self, record: dict[str, Any]) -> None:
        self.forward_record = record
        self.model = training_forward(self.wrapped, record)

    # --- resume -------------------------------------------------------------------------------
    def _find_checkpoint(self) -> tuple[Path, ModelFile] | None:
        """The checkpoint to resume from (--resume FILE, or auto: the newest complete one), else None.

        Starting a new run in an --output that holds an earlier one (also `--resume auto` where none of its
        checkpoints loads) is refused unless --force, whose deletions wait until the run has read its inputs
        (`_clear_earlier_run`) and never touch one of them.
        """
        resume, restarted = self.cfg.resume, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        self.earlier: list[Path] = []
        if resume is None and restarted:
            resume = "auto"  # torchrun --max-restarts restarted us: continue from the last complete checkpoint
        if resume and resume != "auto":
            return Path(resume), load_state(resume)
        found = find_resume(self.out) if resume == "auto" else None
        self.earlier = [] if found is not None else earlier_run(self.out)
        if self.earlier and not (self.cfg.force or restarted):
            what = "but none of its checkpoints loads" if resume == "auto" else "continue it with --resume auto"
            raise ValueError(f"{self.out} already holds a training run ({self.earlier[0].name}): {what}; choose "
                             f"another --output, or pass --force to start over")
        if resume == "auto" and found is None:
            logger.info("--resume auto: no checkpoint in %s, starting fresh", self.out)
        return found

    def _clear_earlier_run(self) -> None:
        """--force: remove the earlier run's files, once the inputs are read, and never a file the run reads."""
        if self.env.is_main:
            inputs = [Path(v) for v in self.cfg.to_dict().values() if isinstance(v, str) and v and Path(v).is_file()]
            for p in self.earlier:
                if any(same_file(p, i) for i in inputs):
                    logger.info("--force: keeping %s (this run reads it)", p)
                else:
                    p.unlink(missing_ok=True)
        self.earlier = []
        D.barrier(self.env)

    def resume(self) -> None:
        """Load the checkpoint found at set-up (if any); then write config.yaml and log the run."""
        cfg = self.cfg
        tracked, resumed_step = None, None
        if self.found is not None:
            path, file = self.found
            self._check_identity(path, file)
            self._check_run(path, file.training_state())
            self.state.load_state_dict(file.training_state())
            p = self.state.progress
            logger.info("resumed from %s (epoch %d, batch %d, step %d)", path, p.epoch + 1, p.batch, p.step)
            tracked, resumed_step = file.training_state().get("tracking"), p.step
            if self.governor is not None and file.training_state().get("threads"):
                self.governor.load_state_dict(file.training_state()["threads"])
            if self.cfg.precision == "auto" and file.training_state().get("train_precision"):
                self._use_precision(file.training_state()["train_precision"])
            if self.cfg.compile and file.training_state().get("train_forward"):
                self._use_forward(file.training_state()["train_forward"])
            self.found = None  # the state is in the model now; free the copy
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_yaml(cfg, self.out / "config.yaml")
            self.tracking = Tracking(parse_log_to(cfg.log_to), self.out, cfg.to_dict(), project=cfg.project,
                                     saved=tracked, resumed_step=resumed_step)
            logger.info("%s; global batch %d (%d x %d x %d processes), peak lr %.3g, %d steps (%d warmup), %s on %s",
                        self.task.summary(self.train_ds, self.val_ds),
                        cfg.batch_size * cfg.grad_accum * self.env.world_size, cfg.batch_size, cfg.grad_accum,
                        self.env.world_size, self.peak_lr, self.total_steps, self.warmup_steps, cfg.precision,
                        self.env.device)

    def run_info(self) -> dict[str, Any]:
        """What defines the run beyond the model: the data (its sample count and a hash of what each sample
        is), the batch, the seed, the processes; saved in every checkpoint, checked on resume."""
        import hashlib

        names = "\n".join(self.task.sample_name(self.train_ds, i) for i in range(len(self.train_ds)))
        cfg, world = self.cfg, self.env.world_size
        return {"samples": len(self.train_ds), "data_sha256": hashlib.sha256(names.encode()).hexdigest()[:16],
                "seed": cfg.seed, "global_batch": cfg.batch_size * cfg.grad_accum * world,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world_size": world}

    def _check_run(self, path: Path, state: dict[str, Any]) -> None:
        """A checkpoint of this run on other data, seed or global batch (or, mid-epoch, another split of the batch
        over processes and accumulation) is refused: resuming it would mix two runs. --resume-anyway accepts
        it on purpose (said in the log)."""
        saved, now = state.get("run"), self.run_info()
        if not isinstance(saved, dict):
            logger.info("%s predates run fingerprints: data, batch and seed not checked", path)
            return
        mid_epoch = state["progress"]["batch"] > 0  # (between epochs the global batch may be split anew)
        fields = [k for k in now if mid_epoch or k not in ("batch_size", "grad_accum", "world_size")]
        diff = [f"{k} {saved.get(k)} -> {now[k]}" for k in fields if saved.get(k) != now[k]]
        if not diff:
            return
        what = ", ".join("the data (" + d + ")" if d.startswith(("samples", "data_sha256")) else d for d in diff)
        if not self.cfg.resume_anyway:
            raise ValueError(f"{path} is a checkpoint of another run: {what}; resume it as it was, choose another "
                             f"--output, or pass --resume-anyway to continue it on purpose")
        logger.warning("--resume-anyway: resuming %s although %s", path, what)

    def _check_identity(self, path: Path, file: ModelFile) -> None:
        ours, theirs = self.task.identity(), {"task": file.task, "spec": file.spec}
        if theirs != ours:
            def show(d: dict) -> str:
                flat = {"task": d.get("task"), **(d.get("spec") or {})}
                return ", ".join(f"{k} {len(v) if isinstance(v, list) else v}" for k, v in flat.items()
                                 if k in diff)
            flat_ours, flat_theirs = {"task": ours["task"], **ours["spec"]}, {"task": file.task, **file.spec}
            diff = [k for k in {**flat_ours, **flat_theirs} if flat_ours.get(k) != flat_theirs.get(k)]
            raise ValueError(f"{path} belongs to another run ({show(theirs)}); this run has {show(ours)}: "
                             f"use another --output")

    # --- one epoch ----------------------------------------------------------------------------
    def train_epoch(self) -> dict[str, Any]:
        """Train until the end of the epoch (from mid-epoch after a resume); returns its metrics line."""
        cfg, p = self.cfg, self.state.progress
        self.sampler.set_epoch(p.epoch, start=p.batch * cfg.batch_size)
        self.model.train()
        t0, self.n_images, self.step_ok = time.perf_counter(), 0, True
        bar = tqdm(total=len(self.train_loader), initial=p.batch, desc=f"epoch {p.epoch + 1}/{cfg.epochs}",
                   disable=not (cfg.progress and self.env.is_main), dynamic_ncols=True, leave=False)
        self.window.start(p, self.n_images)
        if self.governor is not None:
            self.governor.start()
        for batch in self.train_loader:
            self.window.batch_arrived()
            self.train_batch(batch)
            bar.update(1)
            if p.batch % cfg.grad_accum == 0:  # optimizer step boundary
                self.optimizer_step()
                if self.governor is not None:
                    self.governor.step_done(p.step, cfg.batch_size * cfg.grad_accum)
                if p.step % cfg.log_every == 0 and self.tracking.names:  # (rank 0 only has trackers)
                    self.tracking.step(p.step, self.window.scalars(p, self.n_images, self.lr, self._extras()))
                if p.step % cfg.log_every == 0 or p.batch == len(self.train_loader):
                    bar.set_postfix(loss=f"{p.loss_sums.get('loss', 0.0) / max(p.loss_count, 1):.4f}",
                                    lr=f"{self.lr:.2e}", img_s=f"{self.n_images / max(time.perf_counter() - t0, 1e-9):.0f}")
                if cfg.save_every_steps and p.step % cfg.save_every_steps == 0:
                    self.save()
            if p.batch >= self.steps_per_epoch * cfg.grad_accum:
                break  # the tail that cannot fill an optimizer step is left out, as drop_last
            self.window.batch_done()
        bar.close()
        self._check_bad_fraction()
        return self._epoch_line(time.perf_counter() - t0)

    def _check_bad_fraction(self) -> None:
        p, limit = self.state.progress, self.cfg.max_bad_fraction
        seen = p.loss_count + p.bad_images
        if p.loss_count == 0 or p.bad_images > limit * seen:
            kind = self.task.sample_kind
            raise TooManyBadSamplesError(
                f"epoch {p.epoch + 1}: {p.bad_images} of {seen} {kind}s were unreadable (more than "
                f"--max-bad-fraction {limit}); nothing of this epoch is kept. Check the data (the warnings above "
                f"name the files)" if p.loss_count else f"epoch {p.epoch + 1}: not one usable {kind} in {seen}; "
                f"check the data (the warnings above name the files)")

    def _epoch_line(self, train_time: float) -> dict[str, Any]:
        p, opt = self.state.progress, self.state.optimizer
        line: dict[str, Any] = {"epoch": p.epoch + 1, "train_loss": p.loss_sums.get("loss", 0.0) / max(p.loss_count, 1)}
        for name in self._loss_names()[1:]:
            line[f"train_{name}"] = p.loss_sums.get(name, 0.0) / max(p.loss_count, 1)
        line.update(lr=opt.param_groups[0]["lr"] / opt.param_groups[0]["lr_scale"], step=p.step,
                    train_time_s=round(train_time, 2), train_img_s=round(self.n_images / max(train_time, 1e-9), 1))
        if self.governor is not None:
            line["threads"] = self.governor.threads
        if p.bad_images:
            line["bad_images"] = p.bad_images
        if p.nan_skipped:
            line["nan_skipped"] = p.nan_skipped
        return line

    def _loss_names(self) -> list[str]:
        """"loss" (the total that is optimised) and, when the task has several, each named loss."""
        names = list(self.task.loss_names)
        return ["loss"] if len(names) == 1 else ["loss", *names]

    # --- one micro-batch and one optimisation step ----------------------------------------------
    def _lr(self, step: int) -> float:
        cfg = self.cfg
        if cfg.schedule == "cosine":
            return lr_at(step, base_lr=self.peak_lr, min_lr=cfg.min_lr, warmup_steps=self.warmup_steps,
                         total_steps=self.total_steps)
        return mmcv_lr_at(step, schedule=cfg.schedule, base_lr=self.peak_lr, min_lr=cfg.min_lr,
                          warmup_steps=self.warmup_steps, total_steps=self.total_steps, warmup_ratio=cfg.warmup_ratio,
                          steps_per_epoch=self.steps_per_epoch, milestones=cfg.lr_steps)

    def train_batch(self, batch: Batch) -> None:
        """Forward and backward of one micro-batch, with the NaN decision shared by all ranks."""
        cfg, p = self.cfg, self.state.progress
        if len(batch):
            batch = self.task.prepare(self._to_device(batch), self.env.device)
        if batch.bad:
            self._report_bad(batch.bad)
        if p.batch % cfg.grad_accum == 0:  # first micro-batch of an optimizer step
            self.lr = self._lr(p.step)
            for g in self.state.optimizer.param_groups:
                g["lr"] = self.lr * g["lr_scale"]
            self.step_ok = True
        torch.manual_seed(_step_seed(cfg.seed, p.epoch, p.batch, self.env.rank))  # mixup and drop path
        losses, compute = None, batch if len(batch) else None
        if self.env.distributed:
            # Every rank runs a backward (DDP's gradient all-reduce) or none does. A rank whose batch came out
            # empty (every image unreadable) backwards its last good batch with the loss weighted 0; until
            # each rank has had a good one, a batch empty anywhere is left out everywhere (one vote per batch).
            if self.stand_in is None:
                if D.sum_all([float(not len(batch))], self.env)[0] > 0:
                    compute = None
            elif not len(batch):
                compute = self.stand_in
        if cfg.precision == "auto" and compute is not None:
            self._choose_precision(compute)  # on every rank together (the conditions above are shared)
            cfg = self.cfg
        if cfg.compile and self.forward_record is None and compute is not None:
            self._choose_forward(compute)
        if compute is not None:
            with autocast(self.env.device, cfg.precision):
                losses = self._named_losses(self.task.loss(self.model, compute, self.env.device))
            if compute is not batch:
                losses = {k: v * 0.0 for k, v in losses.items()}
        # One reduction per step: every rank learns whether any rank saw a non-finite loss (so all take
        # the same branch, no hang) and the global loss sums (so every rank's progress, and the checkpoint
        # rank 0 writes, hold the same numbers).
        names = self._loss_names()
        bad_local = losses is not None and not bool(torch.isfinite(losses["loss"]))
        sums = [0.0 if (losses is None or bad_local) else losses[k].item() * len(batch) for k in names]
        stats = D.sum_all([float(bad_local), sums[0], float(len(batch)), float(len(batch.bad)), *sums[1:]], self.env)
        p.bad_images += int(stats[3])
        if stats[0] > 0:
            self._non_finite(batch, bad_local)
        else:
            if losses is not None:
                self.state.scaler.scale(losses["loss"] / cfg.grad_accum).backward()
                if self.env.distributed and compute is batch:
                    self.stand_in = batch
            for k, v in zip(names, [stats[1], *stats[4:]], strict=True):
                p.loss_sums[k] = p.loss_sums.get(k, 0.0) + v
            p.loss_count += int(stats[2])
            self.n_images += int(stats[2])
        p.batch += 1

    def _to_device(self, batch: Batch) -> Batch:
        return batch.to(self.env.device, channels_last=self.cfg.channels_last)

    def _named_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss": the sum that is optimised, **the task's named losses} (the names the task declares)."""
        if "loss" in losses and len(losses) > 1:
            raise TypeError(f"{type(self.task).__name__}.loss: 'loss' names the sum of the losses; name yours otherwise")
        if set(losses) != set(self.task.loss_names):
            raise TypeError(f"{type(self.task).__name__}.loss returned {sorted(losses)}; its loss_names declare "
                            f"{sorted(self.task.loss_names)}")
        return {"loss": sum(losses.values()), **losses}

    def _non_finite(self, batch: Batch, here: bool) -> None:
        p = self.state.progress
        names = [self.task.sample_name(self.train_ds, i) for i in batch.indices]
        msg = (f"non-finite loss at epoch {p.epoch + 1}, step {p.step}, batch {p.batch}"
               + (f" (files: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if here else
                  " on another process"))
        if self.cfg.nan_policy == "abort":
            raise NonFiniteLossError(msg + "; no checkpoint written. --nan-policy skip skips such steps")
        logger.warning("%s; skipping this step", msg)
        self.step_ok = False

    def _report_bad(self, indices: list[int]) -> None:
        kind = self.task.sample_kind
        for i in indices:
            name, reason = self.task.sample_name(self.train_ds, i), self.task.unreadable_reason(self.train_ds, i)
            if self.cfg.bad_images == "error":
                raise DataError(f"unreadable {kind} {name} ({reason}); use --bad-images skip to train without it")
            if i not in self.seen_bad:
                self.seen_bad.add(i)
                logger.warning("skipping unreadable %s %s (%s)", kind, name, reason)

    def optimizer_step(self) -> None:
        """Unscale and clip, step the optimizer and the EMA (unless a non-finite loss was skipped)."""
        state, p = self.state, self.state.progress
        logged = self.cfg.log_to and (p.step + 1) % self.cfg.log_every == 0  # (the same on every rank)
        if self.step_ok:
            if self.cfg.clip_grad is not None or logged:
                state.scaler.unscale_(state.optimizer)
                norm = (nn.utils.clip_grad_norm_(state.model.parameters(), self.cfg.clip_grad)
                        if self.cfg.clip_grad is not None else
                        nn.utils.get_total_norm([w.grad for w in state.model.parameters() if w.grad is not None]))
                self.window.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            if state.ema is not None:
                state.ema.update_parameters(state.model)
        else:
            p.nan_skipped += 1
        state.optimizer.zero_grad(set_to_none=True)
        p.step += 1

    def _extras(self) -> dict[str, float]:
        """The per-step scalars that are not the window's: loss scale (fp16) and memory."""
        out: dict[str, float] = {}
        if self.state.scaler.is_enabled():
            out["loss_scale"] = float(self.state.scaler.get_scale())
        if self.env.device.type == "cuda":
            out["memory_mb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**20
        else:
            import resource

            out["memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (Linux: KiB)
        return out

    # --- evaluation, end of epoch, checkpoints -------------------------------------------------
    def evaluate_if_due(self) -> dict[str, float]:
        """The task's metrics (and the EMA's best metric) every --eval-every epochs and after the last."""
        cfg, epoch = self.cfg, self.state.progress.epoch + 1
        if self.val_loader is None or not (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            return {}
        if cfg.precision == "auto":  # no training batch came before (a resume at an epoch's very end)
            self._use_precision({"precision": "fp32", "reason": "evaluated before any training batch"})
            cfg = self.cfg
        model = self.state.model if self.env.distributed else self.model
        loader = DeviceLoader(self.val_loader, self._to_device)
        metrics = self.task.evaluate(model, loader, self.env.device, progress=cfg.progress and self.env.is_main,
                                     lockstep=cfg.fsdp)
        if self.env.is_main:
            self.task.plot(model, self.val_ds, self.env.device)
        if self.state.ema is not None:
            ema = self.task.evaluate(self.state.ema.module, loader, self.env.device, progress=False, lockstep=False)
            metrics[f"{self.task.best_metric}_ema"] = ema[self.task.best_metric]
        return metrics

    def end_epoch(self, line: dict[str, Any]) -> None:
        """Best weights, metrics.jsonl, curves.png, the log line, then the end-of-epoch checkpoint."""
        p, task = self.state.progress, self.task
        value = line.get(task.best_metric)
        if value is not None and (p.best is None or (value > p.best if task.higher_is_better else value < p.best)):
            p.best = value
            best_sd = self.state.model_state()
            if self.env.is_main:
                task.save_best(self.state.model, best_sd, self.out, p.epoch + 1, line)
        self.state.history.append(line)
        p.next_epoch()
        if self.env.is_main:
            self._write_logs(line)
            self.tracking.epoch(p.step, line)
        self.save()

    def _write_logs(self, line: dict[str, Any]) -> None:
        from ..plots import plot_curves

        text = "".join(json.dumps(h) + "\n" for h in self.state.history)
        atomic_write(self.out / "metrics.jsonl", lambda tmp: Path(tmp).write_text(text))
        write_summary_csv(self.out / "summary.csv", self.state.history)
        plot_curves(self.state.history, self.out / "curves.png")
        shown = "  ".join(f"{k} {v:.4f}" if "loss" in k else f"{k} {v:.2f}" for k, v in line.items()
                          if k.startswith(("train_loss", "val_", "train_")) and k not in ("train_time_s", "train_img_s"))
        logger.info("epoch %d/%d  %s  lr %.2e  %.0f img/s  %.1f s%s", line["epoch"], self.cfg.epochs, shown, line["lr"],
                    line["train_img_s"], line["train_time_s"],
                    f"  ({line['bad_images']} unreadable samples skipped)" if "bad_images" in line else "")

    def save(self) -> None:
        """Checkpoint the full state (collective under FSDP; rank 0 writes), never from a non-finite state."""
        model, p = self.state.model, self.state.progress
        if not all(bool(torch.isfinite(w.full_tensor() if hasattr(w, "full_tensor") else w).all())
                   for w in model.parameters()):
            raise NonFiniteLossError(f"parameters are not finite at step {p.step}; no checkpoint written")
        state = self.state.state_dict()
        if self.env.is_main:
            self.tracking.flush()
            save_state(self.out, {**header(self.task.name, self.task.spec()), "config": self.cfg.to_dict(),
                                  "run": self.run, "tracking": self.tracking.state_dict(),
                                  **({"threads": self.governor.state_dict()} if self.governor is not None else {}),
                                  **({"train_forward": self.forward_record} if self.forward_record else {}),
                                  **({"train_precision": self.precision_record} if self.precision_record else {}),
                                  **state}, p.step,
                       keep=self.cfg.keep_checkpoints)
        D.barrier(self.env)

    def summary(self) -> dict[str, Any]:
        last = dict(self.state.history[-1]) if self.state.history else {}
        return last | {"best": self.state.progress.best, "best_metric": self.task.best_metric, "output": str(self.out),
                       "model": self.cfg.model, "precision": self.cfg.precision,
                       **({"precision_choice": self.precision_record} if self.precision_record else {})}


__all__ = ["NonFiniteLossError", "PeerLostError", "TooManyBadSamplesError", "Progress", "TrainState", "Trainer", "fit"]
