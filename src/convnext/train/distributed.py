"""The little we need around torch.distributed: read torchrun's environment, pick the backend, and say
which node was lost when a collective fails.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..utils import all_gather_list, all_reduce_max, all_reduce_sum, pick_device, process_rank

__all__ = ["DistEnv", "PeerLostError", "all_gather_list", "all_reduce_max", "all_reduce_sum", "barrier", "cleanup",
           "process_rank", "setup", "sum_all"]

HEARTBEAT_S = 1.0  # how often each process tells the store it is alive


class PeerLostError(RuntimeError):
    """A collective failed because another process (or a whole node) stopped."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    peers: tuple[tuple[int, int, str], ...] = ()  # (rank, node rank, host) of every process
    store: Any = field(default=None, compare=False, repr=False)
    heartbeat: Heartbeat | None = field(default=None, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(preference: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank, world)
    if world == 1 or dist.is_initialized():
        return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get("CONVNEXT_DIST_TIMEOUT", "600")))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    # After torchrun restarts workers (--max-restarts, on any node, with any restart count), the store
    # still holds the dead round's peer addresses under the default keys, and gloo/NCCL connect to
    # those (pytorch/pytorch#167288). Every process of every round counts itself in once, so the
    # count names the round, the same on every node: a per-round key prefix keeps rounds apart.
    round_ = (store.add("convnext/joined", 1) - 1) // world
    store = dist.PrefixStore(f"convnext/round{round_}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout)
    me = (rank, int(os.environ.get("GROUP_RANK", "0")), socket.gethostname())
    peers: list[Any] = [None] * world
    dist.all_gather_object(peers, me)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device,
                   peers=tuple(tuple(p) for p in peers), store=store, heartbeat=Heartbeat(store, rank))


class Heartbeat:
    """A thread that counts up `heartbeat/<rank>` in the store every HEARTBEAT_S, until stopped."""

    def __init__(self, store: Any, rank: int) -> None:
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, args=(store, f"heartbeat/{rank}"), daemon=True,
                                       name="convnext-heartbeat")
        self.thread.start()

    def _beat(self, store: Any, key: str) -> None:
        while not self.stopped.is_set():
            try:
                store.add(key, 1)
            except Exception:  # noqa: BLE001 - the store is gone: nothing left to tell
                return
            self.stopped.wait(HEARTBEAT_S)

    def stop(self) -> None:
        """Stop and join, before the store and process group go (a thread left inside the store at exit aborts)."""
        self.stopped.set()
        self.thread.join(timeout=10)


def lost_peers(env: DistEnv) -> list[tuple[int, int, str]] | None:
    """The processes whose heartbeat stopped (checked over a few beats), or None if the store is unreachable."""
    try:
        before = [env.store.add(f"heartbeat/{r}", 0) for r, _, _ in env.peers]
        time.sleep(3 * HEARTBEAT_S)
        after = [env.store.add(f"heartbeat/{r}", 0) for r, _, _ in env.peers]
    except Exception:  # noqa: BLE001
        return None
    return [p for p, a, b in zip(env.peers, before, after, strict=True) if a == b]


def is_communication_failure(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection closed", "Broken pipe"))


def describe_failure(env: DistEnv, e: BaseException) -> str:
    """One line: which node(s) stopped answering, and the collective's own error."""
    lost = lost_peers(env)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if lost is None:
        who = "the rendezvous store is unreachable (its node, usually node 0, stopped)"
    elif lost:
        nodes = sorted({(node, host) for _, node, host in lost})
        who = "lost " + ", ".join(f"node {node} ({host}, rank{'s' if len(ranks) > 1 else ''} "
                                  f"{', '.join(map(str, ranks))})"
                                  for node, host in nodes
                                  for ranks in [[r for r, n, h in lost if (n, h) == (node, host)]])
    else:
        who = "every process still answers (a network fault?)"
    return f"a collective failed on rank {env.rank}: {who}; {first}"


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def sum_all(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64: exact for counts and loss sums)."""
    if not env.distributed:
        return values
    return all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=env.device)).tolist()


def cleanup(env: DistEnv) -> None:
    if env.heartbeat is not None:
        env.heartbeat.stop()
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalisation with the statistics of the whole global batch (every process's samples), forward
    and backward: the math of torch's SyncBatchNorm (whose kernels exist on GPUs only), for gloo on CPUs."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        c, dims = x.shape[1], [d for d in range(x.ndim) if d != 1]
        shape = [1, c] + [1] * (x.ndim - 2)
        xf = x.float()
        total = all_reduce_sum(torch.cat([xf.sum(dims), torch.tensor([xf.numel() / c], dtype=torch.float32)]))
        n, mean = total[c], total[:c] / total[c]
        centred = xf - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n  # two passes: no cancellation in E[x^2] - E[x]^2
        invstd = torch.rsqrt(var + eps)
        xhat = centred * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.n, ctx.dims, ctx.shape = n, dims, shape
        y = xhat * weight.float().view(shape) + bias.float().view(shape)
        return y.to(x.dtype), mean, var * n / (n - 1).clamp(min=1)

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        xhat, weight, invstd = ctx.saved_tensors
        dyf, shape = dy.float(), ctx.shape
        local = torch.cat([dyf.sum(ctx.dims), (dyf * xhat).sum(ctx.dims)])  # the parameters' grads (DDP averages)
        c = weight.shape[0]
        total = all_reduce_sum(local.clone())
        sum_dy, sum_dy_xhat = total[:c].view(shape), total[c:].view(shape)
        dx = (weight.float() * invstd).view(shape) / ctx.n * (ctx.n * dyf - sum_dy - xhat * sum_dy_xhat)
        return dx.to(dy.dtype), local[c:].to(weight.dtype), local[:c].to(weight.dtype), None


class CpuSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process (the official det/seg configs' SyncBN), on
    CPUs; in eval mode, and with one process, exactly BatchNorm2d. Same parameters, buffers and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        y, mean, var = _SyncBatchNormFn.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(var.to(self.running_var.dtype), alpha=m)
        return y


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Several processes: BatchNorm statistics over the global batch (torch's SyncBatchNorm on GPUs, ours on
    CPUs), so that N processes compute what one process computes on their N batches together."""
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            sync.weight, sync.bias = child.weight, child.bias
            for buf in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(sync, buf, getattr(child, buf))
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, device)
    return model
