"""`--threads auto` (the default): the torch thread count follows the measured step time.

With every core busy in torch, one other CPU-bound process makes the OpenMP threads wait for a core they do
not have at every parallel region: on 2 cores the demo step drops to 0.27x of its quiet rate, where one
thread keeps 0.76x (`convnext bench --mode contention`, benchmarks/README.md). No fixed choice is free (one
thread loses a third on a free machine), so the governor watches the time per image of the training steps,
in windows of `window` optimizer steps (medians: a stray slow step moves nothing):

- two windows in a row slower than `slow` x the fastest seen at this thread count since arriving there: the
  machine became shared; halve the threads;
- probes: one window at the neighbouring count (twice the threads below the full count, every `probe_every`
  windows; half the threads at the full count, first after `first_probe` windows: a machine shared from the
  start has no quiet time to compare with). At least 5% faster per image than the fastest window at the count
  it left, the run stays there; otherwise it goes back and waits twice as long before the next probe that way (at most
  `max_probe_every` windows): on a free machine the probes down cost ~2% of an epoch of the demo, then less.

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

    GAIN = 0.95  # a probe must run at most this fraction of the time per image to stay

    def __init__(self, full: int, *, window: int = 4, slow: float = 1.5, probe_every: int = 8, first_probe: int = 2,
                 max_probe_every: int = 64, clock=time.perf_counter, apply=torch.set_num_threads) -> None:
        if full < 1 or window < 1 or slow <= 1 or probe_every < 1 or first_probe < 1:
            raise ValueError("ThreadGovernor: full, window, probe_every, first_probe >= 1 and slow > 1")
        self.full, self.threads = full, full
        self.window, self.slow, self.base_probe, self.max_probe = window, slow, probe_every, max_probe_every
        self.clock, self.apply = clock, apply
        self.switches: list[dict[str, Any]] = []  # {"step", "threads", "why"}
        self._times: list[float] = []
        self._mark: float | None = None
        self._reset_level()
        # windows until the next probe, and the current interval, up (more threads) and down (fewer)
        self._wait = {"up": probe_every, "down": first_probe}
        self._every = dict(self._wait)
        self._probe: tuple[int, float] | None = None  # (the count it left, its fastest window) while probing

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
        if self._probe is not None:
            return self._probe_result(step, med)
        if med > self.slow * self._ref and self.threads > 1:
            self._slow_windows += 1
            if self._slow_windows < 2:
                return None
            self._wait["up"] = self._every["up"] = self.base_probe
            return self._change(step, max(1, self.threads // 2), f"steps {med / self._ref:.2f}x slower per image "
                                f"than their fastest at {self.threads} threads: the CPU is shared")
        self._slow_windows = 0
        self._ref = min(self._ref, med)
        for way, target in (("up", min(self.full, 2 * self.threads)), ("down", max(1, self.threads // 2))):
            if target != self.threads:
                self._wait[way] -= 1
                if self._wait[way] <= 0:
                    self._probe = (self.threads, self._ref)  # (the fastest here: noise does not make a probe win)
                    return self._change(step, target, f"a probe {way}", quiet=True)
        return None

    def _probe_result(self, step: int, med: float) -> int | None:
        origin, origin_time = self._probe
        self._probe = None
        way = "up" if self.threads > origin else "down"
        if med <= self.GAIN * origin_time:  # better here: stay
            logger.info("threads: %d from step %d (a probe ran %.2fx faster per image than %d threads)",
                        self.threads, step, origin_time / med, origin)
            self._wait = {"up": self.base_probe, "down": self.base_probe}
            self._every = dict(self._wait)
            self._reset_level()
            self._ref = med
            return None
        self._every[way] = self._wait[way] = min(2 * self._every[way], self.max_probe)
        return self._change(step, origin, f"a probe at {self.threads} threads took {med / origin_time:.2f}x the "
                            f"time per image of {origin}", quiet=way == "down")

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
    KEEP = 1000  # the last switches a checkpoint keeps (a long shared run probes every few hundred steps)

    def state_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "full": self.full, "switches": self.switches[-self.KEEP:],
                "wait": dict(self._wait), "every": dict(self._every)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the count the checkpoint was written with (at most this machine's full count)."""
        self.switches = list(state.get("switches", []))
        self.threads = max(1, min(self.full, int(state.get("threads", self.full))))
        for mine, saved in ((self._wait, state.get("wait")), (self._every, state.get("every"))):
            mine.update({k: int(v) for k, v in (saved or {}).items() if k in mine})
        self.apply(self.threads)
        self._reset_level()
