"""`--threads auto`: the thread governor (train/governor.py) on scripted step times, and in the engine."""

import functools

import pytest
import torch

from convnext.train.governor import ThreadGovernor


class Machine:
    """A clock whose step takes `per_image[threads]` seconds per image; `shared` switches the table."""

    def __init__(self):
        self.now, self.threads, self.shared = 0.0, 2, False
        self.quiet = {2: 1.0, 1: 1.6}  # 2 threads 1.6x faster than 1 on a free machine
        self.busy = {2: 3.7, 1: 1.3}  # beside a busy process: 2 threads collapse (0.27x), 1 holds up

    def clock(self):
        return self.now

    def apply(self, n):
        self.threads = n

    def run(self, governor, steps, images=8, first=0):
        counts = []
        for s in range(first, first + steps):
            self.now += images * (self.busy if self.shared else self.quiet)[self.threads] / 1000
            governor.step_done(s + 1, images)
            counts.append(self.threads)
        return counts


def governed(m, **kw):
    g = ThreadGovernor(2, clock=m.clock, apply=m.apply, **kw)
    g.start()
    return g


def shared_switches(g):
    return [s for s in g.switches if "shared" in s["why"]]


def test_a_free_machine_keeps_its_threads_but_for_ever_rarer_probes():
    m = Machine()
    g = governed(m, window=4, first_probe=2, max_probe_every=64)
    counts = m.run(g, 2000)
    assert counts[-1] == 2 and not shared_switches(g)
    assert sum(c == 1 for c in counts) / len(counts) < 0.03  # the probes down cost little
    downs = [s["step"] for s in g.switches if s["threads"] == 1]
    gaps = [b - a for a, b in zip(downs, downs[1:], strict=False)]
    assert downs[0] <= 12 and len(downs) >= 4 and gaps == sorted(gaps) and gaps[-1] > gaps[0]


def test_a_machine_shared_from_the_start_is_found_by_the_first_probe():
    m = Machine()
    m.shared = True  # no quiet time to compare with: only a probe at fewer threads can tell
    g = governed(m, window=4, first_probe=2)
    counts = m.run(g, 400)
    assert counts.index(1) <= 12 and sum(c == 1 for c in counts[12:]) / len(counts[12:]) > 0.9


def test_a_shared_machine_drops_to_one_thread_and_probes_back_less_and_less_often():
    m = Machine()
    g = governed(m, window=4, probe_every=8)
    m.run(g, 40)
    m.shared = True
    counts = m.run(g, 600, first=40)
    first_one = counts.index(1)
    assert first_one <= 12  # two slow windows of 4 steps (the first may straddle the change), or a probe
    ups = [s["step"] for s in g.switches if s["threads"] == 2 and s["step"] > 40]
    assert len(ups) >= 3
    gaps = [b - a for a, b in zip(ups, ups[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # waiting twice as long after each failed probe
    share_at_two = sum(c == 2 for c in counts[first_one:]) / len(counts[first_one:])
    assert share_at_two < 0.1  # probes are a small part of the shared stretch
    m.shared = False  # the other process ends: a probe finds the machine free and stays
    counts = m.run(g, 600, first=640)
    assert counts[-100:].count(2) >= 96 and g.threads == 2


def test_one_slow_window_is_not_a_shared_machine():
    m = Machine()
    g = governed(m, window=4)
    m.run(g, 40)
    m.shared = True
    m.run(g, 4, first=40)  # one window only (e.g. the OS writing a checkpoint)
    m.shared = False
    m.run(g, 100, first=44)
    assert not shared_switches(g) and g.threads == 2


def test_the_step_after_a_pause_is_not_counted():
    m = Machine()
    g = governed(m, window=2)
    m.run(g, 10)
    for _ in range(3):  # an evaluation between epochs: a long pause, then `start`
        m.now += 100.0
        g.start()
        m.run(g, 10)
    assert not shared_switches(g)


def test_a_checkpoint_carries_the_thread_count_and_its_history():
    m = Machine()
    g = governed(m, window=4)
    m.run(g, 40)
    m.shared = True
    m.run(g, 20, first=40)
    state = g.state_dict()
    assert state["threads"] == 1 and state["switches"]
    m2 = Machine()
    again = ThreadGovernor(2, clock=m2.clock, apply=m2.apply)
    again.load_state_dict(state)
    assert again.threads == 1 and m2.threads == 1 and again.switches == state["switches"]
    assert again.state_dict()["wait"] == state["wait"]  # the probe schedule continues
    small = ThreadGovernor(1, clock=m2.clock, apply=m2.apply)
    small.load_state_dict({"threads": 8, "switches": []})  # (resumed on a smaller machine)
    assert small.threads == 1
    with pytest.raises(ValueError):
        ThreadGovernor(0)


def test_the_engine_governs_threads_records_each_switch_and_resumes_at_the_saved_count(tmp_path, monkeypatch):
    """The default run (no --threads) on a machine that turns shared after 4 steps: the engine drops to one
    thread, says so in the metrics line and the checkpoint, and a resumed run starts at one thread."""
    from test_engine import RegressionTask, config

    from convnext.train import engine
    from convnext.train.engine import fit

    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)  # (2 cores, whatever this machine has)
    m = Machine()
    steps, seen = [], []

    def clock():  # each call after a step: the time that step took at the count it ran with
        steps.append(torch.get_num_threads())
        seen.append(torch.get_num_threads())
        m.threads, m.shared = torch.get_num_threads(), len(steps) > 4
        m.now += 8 * (m.busy if m.shared else m.quiet)[m.threads] / 1000
        return m.now

    monkeypatch.setattr(engine, "ThreadGovernor", functools.partial(ThreadGovernor, clock=clock, window=2))
    cfg = config(tmp_path / "run", epochs=2, warmup_epochs=0, workers=0, threads=None)
    out = fit(RegressionTask(cfg))
    assert out["threads"] == 1
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["threads"]["threads"] == 1 and state["threads"]["switches"][0]["threads"] == 1
    assert 2 in seen and 1 in seen  # both counts really ran
    seen.clear()
    fit(RegressionTask(config(tmp_path / "run", epochs=3, warmup_epochs=0, workers=0, threads=None,
                              resume="auto")))
    assert seen and seen[0] == 1
    fixed = fit(RegressionTask(config(tmp_path / "fixed", epochs=1, warmup_epochs=0, workers=0, threads=2)))
    assert "threads" not in fixed  # --threads N: fixed, not governed
