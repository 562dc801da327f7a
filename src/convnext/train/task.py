"""What a task is to the engine: the few things that differ between classification, detection,
segmentation and pre-training. Everything else (moving batches to the device and its memory format,
summing the named losses, resume, DDP/FSDP, AMP, EMA, accumulation, clipping, NaN policy, checkpoints,
metrics.jsonl, plots, progress bars) is the engine's (`train.engine.fit`). Everything outside training
(rebuilding a model from a file, eval and predict commands, the demo) is the task's `tasks.TaskSpec`.

`Task` declares every attribute and method the engine reads, with its default; the engine reads nothing
else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .config import EngineConfig

if TYPE_CHECKING:  # (importing data at run time would pull torchvision into every CLI start)
    from ..data import Batch


class Task:
    """The interface between a task and the engine; subclass it and fill in what differs.

    Datasets: `train[(epoch, index)]` returns a sample whose random augmentation is seeded from
    (seed, epoch, index) (bitwise reproducible, resumable mid-epoch, independent of the number of
    loader workers), or None for an unreadable one; `val[index]` likewise without the epoch.
    """

    name: str = "task"  # the registry name (`tasks.TaskSpec.name`): the `task` in the header of its files
    loss_names: tuple[str, ...] = ("loss",)  # the keys `loss` returns; metrics.jsonl: train_<name> when several
    best_metric: str = "val_loss"  # key of `evaluate`'s result that decides best.safetensors
    higher_is_better: bool = False
    sample_kind: str = "sample"  # how messages call one item of the data ("image")

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg

    def datasets(self) -> tuple[Dataset, Dataset | None]:
        """(train, val); val None for tasks without evaluation."""
        raise NotImplementedError

    def collate(self, items: list[Any]) -> Batch:
        """Loader items -> one `Batch` (unreadable items, returned as None by the dataset, go to `bad`)."""
        raise NotImplementedError

    def prepare(self, batch: Batch, device: torch.device) -> Batch:
        """A training batch once on `device`, before `loss` and before its unreadable samples are counted:
        what is left to do there (classification's `--decode gpu`: decoding and augmenting). Default: as it is."""
        return batch

    def sample_weights(self, train: Dataset) -> Sequence[float] | None:
        """A weight per training sample to draw each epoch's samples by (with replacement; `data.EpochSampler`),
        or None: every sample once an epoch, shuffled."""
        return None

    def sample_groups(self, train: Dataset) -> Sequence[Sequence[int]] | None:
        """Groups of training samples each epoch visits one after another (shuffled, and shuffled within;
        `data.EpochSampler`), e.g. the samples of each WebDataset shard, or None."""
        return None

    def build_model(self) -> nn.Module:
        """The model to train, on the CPU (the engine moves, wraps and shards it)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups with `weight_decay` and `lr_scale`; default: no decay on 1-D, layer decay."""
        from .optim import param_groups

        return param_groups(model, self.cfg.weight_decay, self.cfg.layer_decay, self.cfg.layer_decay_type)

    def loss(self, model: nn.Module, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """The named losses of one batch (keys: `loss_names`); the engine optimises their sum. Runs under
        the engine's autocast; the batch is on `device` already, images in the run's memory format."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, *, progress: bool,
                 lockstep: bool) -> dict[str, float]:
        """Metrics on the validation loader (batches arrive on `device`); exact across processes: reduce
        sums with `train.distributed.all_reduce_sum`.

        `lockstep`: the model is sharded (FSDP), so its forward is collective and every rank must
        run the same number of forwards.
        """
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """What rebuilds the model (the `spec` of the header of every file the run writes)."""
        return {"model_name": self.cfg.model}

    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this run must match to be resumed: the task and its spec."""
        return {"task": self.name, "spec": self.spec()}

    def summary(self, train: Dataset, val: Dataset | None) -> str:
        """One line for the log: the model and the data."""
        return f"{self.cfg.model}: {len(train)} train" + (f" / {len(val)} val samples" if val is not None else " samples")

    def save_best(self, model: nn.Module, state_dict: dict[str, torch.Tensor], output: Path, epoch: int,
                  metrics: dict[str, float]) -> None:
        """Write the best weights so far (rank 0 only; `state_dict` holds the full, unsharded weights)."""
        from ..weights import write_model_file

        write_model_file(output / "best.safetensors", self.name, self.spec(), state_dict,
                         metadata={"epoch": str(epoch), self.best_metric: f"{metrics[self.best_metric]:.6g}"})

    def sample_name(self, dataset: Dataset, index: int) -> str:
        """How messages name a sample (a file path where there is one)."""
        return f"sample {index}"

    def unreadable_reason(self, dataset: Dataset, index: int) -> str:
        """Why a sample came back as None (decoded again here, in the main process, to say why)."""
        return "could not be read"

    def plot(self, model: nn.Module, val: Dataset | None, device: torch.device) -> None:
        """Task pictures after an evaluation (rank 0; e.g. FCMAE's reconstructions.png); default none."""
