"""The little we need around torch.distributed: read torchrun's environment, pick the backend."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=float(os.environ.get("CONVNEXT_DIST_TIMEOUT", "600")))
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0:
            # After `torchrun --max-restarts` restarts the workers, the store still holds the dead
            # round's peer addresses under the default keys, and gloo/NCCL connect to those
            # (pytorch/pytorch#167288). A per-round key prefix keeps the rounds apart.
            agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                  is_master=rank == 0 and not agent_store, timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"convnext/restart{restart}", store),
                                    rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def sum_all(values: list[float], env: DistEnv) -> list[float]:
    """Element-wise sum of `values` over all ranks (float64: exact for counts and loss sums)."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()
