"""`--threads auto` (the default): the torch thread count follows the measured step time.

With every core busy in torch, one other CPU-bound process makes the OpenMP threads wait for a core they do
not have at every parallel region: on 2 cores the demo step drops to 0.27x of its quiet rate, where one
thread keeps 0.76x (`convnext bench --mode contention`, benchmarks/README.md). No fixed choice is free (one
thread loses a third on a free machine), so the governor watches the time per image of the training steps,
in windows of `window` optimizer steps (medians: a stray slow step moves nothing):

- two windows in a row slower than `slow` x the fastest seen at this thread count since arriving there: the
  machine is shared; halve the threads;
- below the full count, every `probe_every` windows one window runs at twice the threads again (a probe):
  faster per image than the last window at the lower count, it stays; slower, it goes back down and waits
  twice as long before the next probe (at most `max_probe_every` windows).

A different thread count sums in another order (39 of convnext_atto's 128 gradients differ between 1 and 2
threads), so every switch is logged with its step and kept in the checkpoint (`state_dict`), and a resumed
run continues at the count the checkpoint was written with. `--threads N` fixes the count (runs that must
repeat bitwise on a machine whose load varies).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


class ThreadGovernor:
    """Chooses the torch thread count between `full` and 1 from the step times it is shown."""

    def __init__(self, full: int, *, window: int = 4, slow: float = 1.5, probe_every: int = 8,
                 max_probe_every: int = 64, clock=time.perf_counter, apply=torch.set_num_threads) -> None:
        if full < 1 or window < 1 or slow <= 1 or probe_every < 1:
            raise ValueError("ThreadGovernor: full, window, probe_every >= 1 and slow > 1")
        self.full, self.threads = full, full
        self.window, self.slow, self.base_probe, self.max_probe = window, slow, probe_every, max_probe_every
        self.clock, self.apply = clock, apply
        self.switches: list[dict[str, Any]] = []  # {"step", "threads", "why"}
        self._times: list[float] = []
        self._mark: float | None = None
        self._reset_level()
        self.probe_every = self.wait = probe_every
        self._probe_from: tuple[int, float] | None = None  # (lower count, its last window) while probing

    def _reset_level(self) -> None:
        self._ref, self._slow_windows = float("inf"), 0

    # --- what the training loop calls --------------------------------------------------------
    def start(self) -> None:
        """A new stretch of steps (an epoch, after evaluation): the next step's time is not counted."""
        self._mark, self._times = None, []

    def step_done(self, step: int, images: int) -> int | None:
        """After an optimizer step of `images` images; returns the new thread count when it switched."""
        now, mark = self.clock(), self._mark
        self._mark = now
        if mark is None or images < 1:
            return None
        self._times.append((now - mark) / images)
        if len(self._times) < self.window:
            return None
        med = statistics.median(self._times)
        self._times = []
        return self._decide(step, med)

    # --- the rules ---------------------------------------------------------------------------
    def _decide(self, step: int, med: float) -> int | None:
        if self._probe_from is not None:  # this window was a probe at twice the threads
            lower, lower_time = self._probe_from
            self._probe_from = None
            if med < lower_time:  # the CPU is free again (or freer): stay
                logger.info("threads: %d from step %d (a probe ran %.2fx faster per image than %d threads)",
                            self.threads, step, lower_time / med, lower)
                self.probe_every = self.wait = self.base_probe
                self._reset_level()
                self._ref = med
                return None
            self.probe_every = min(2 * self.probe_every, self.max_probe)
            self.wait = self.probe_every
            return self._change(step, lower, f"a probe at {self.threads} threads ran {med / lower_time:.2f}x "
                                f"slower per image: the CPU is still shared")
        if med > self.slow * self._ref and self.threads > 1:
            self._slow_windows += 1
            if self._slow_windows < 2:
                return None
            self.probe_every = self.wait = self.base_probe
            return self._change(step, max(1, self.threads // 2), f"steps {med / self._ref:.2f}x slower per image "
                                f"than their fastest at {self.threads} threads: the CPU is shared")
        self._slow_windows = 0
        self._ref = min(self._ref, med)
        if self.threads < self.full:
            self.wait -= 1
            if self.wait <= 0:
                self._probe_from = (self.threads, med)
                return self._change(step, min(self.full, 2 * self.threads), "a probe: is the CPU free again?",
                                    quiet=True)
        return None

    def _change(self, step: int, threads: int, why: str, quiet: bool = False) -> int:
        """Run at `threads` from after `step` on (every change recorded: what ran when)."""
        (logger.debug if quiet else logger.info)("threads: %d -> %d after step %d (%s)", self.threads, threads,
                                                 step, why)
        self.switches.append({"step": step, "threads": threads, "why": why})
        if not quiet:
            self._reset_level()
        self.threads = threads
        self.apply(threads)
        return threads

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "full": self.full, "switches": list(self.switches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the count the checkpoint was written with (at most this machine's full count)."""
        self.switches = list(state.get("switches", []))
        self.threads = max(1, min(self.full, int(state.get("threads", self.full))))
        self.apply(self.threads)
        self._reset_level()
