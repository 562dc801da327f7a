"""torchrun on CPU (gloo): DDP equivalence, exact distributed eval, rank failures, FSDP checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from convnext.data.fashion_mnist import prepare
from convnext.weights import read_checkpoint

from test_train import FAST, _args, assert_same_run, cli, final_state

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("ddp") / "fm", per_class={"train": 30, "val": 10})


def torchrun(nproc, *args, max_restarts=0, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={max_restarts}", "-m", "convnext", *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, **popen)


def metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_double_batch(fmnist, tmp_path):
    common = {**FAST, "data": fmnist, "epochs": 2, "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.25}
    r1 = cli("train", *_args(**{**common, "output": tmp_path / "one", "batch_size": 32}))
    assert r1.returncode == 0, r1.stderr
    r2 = torchrun(2, "train", *_args(**{**common, "output": tmp_path / "two", "batch_size": 16}))
    assert r2.returncode == 0, r2.stderr
    assert "global batch 32 (16 x 1 x 2 processes)" in r2.stderr
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(m1, m2):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_acc1"] == pytest.approx(b["val_acc1"], abs=1.01)  # at most one image flips
    s1, s2 = final_state(tmp_path / "one")["model"], final_state(tmp_path / "two")["model"]
    for k in s1:
        torch.testing.assert_close(s1[k], s2[k], atol=1e-4, rtol=1e-3)


def _eval_worker(rank, world, store, root, out):
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    import convnext
    from convnext.data import ImageFolder, ShardSampler, collate, eval_transform
    from convnext.eval import evaluate
    from convnext.preprocess import Preprocess

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = convnext.create_model("convnext_atto", num_classes=10)
    ds = ImageFolder(root, transform=eval_transform(Preprocess(32, crop_pct=1.0)))
    loader = DataLoader(ds, batch_size=8, sampler=ShardSampler(len(ds), rank, world), collate_fn=collate)
    res = evaluate(model, loader, torch.device("cpu"), 10)
    if rank == 0:
        torch.save({"count": res["count"], "confusion": res["confusion"], "acc1": res["acc1"]}, out)
    dist.destroy_process_group()


def test_distributed_eval_counts_every_sample_once(fmnist, tmp_path):
    import shutil

    import torch.multiprocessing as mp

    root = tmp_path / "val"
    shutil.copytree(fmnist / "val", root)
    shutil.copy(next((root / "Bag").glob("*.png")), root / "Bag" / "extra.png")  # 101 images: odd
    mp.spawn(_eval_worker, args=(2, tmp_path / "store", root, tmp_path / "two.pt"), nprocs=2)
    mp.spawn(_eval_worker, args=(1, tmp_path / "store1", root, tmp_path / "one.pt"), nprocs=1)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["count"] == one["count"] == 101
    assert torch.equal(two["confusion"], one["confusion"])


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _workers(launcher_pid, n=2, timeout=120):
    """The training worker processes under `convnext train --nproc` -> torchrun -> workers."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        found = [w for c in _children(launcher_pid) for w in _children(c)]
        if len(found) >= n:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun workers did not start")


def _run_and_kill_a_rank(fmnist, output, kw, max_restarts):
    cmd = [sys.executable, "-m", "convnext", "train", *_args(**{**FAST, **kw, "data": fmnist, "output": output}),
           "--nproc", "2", "--max-restarts", str(max_restarts)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not (output / "checkpoints" / "step-00000004.pt").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 300
        time.sleep(0.05)
    victim = _workers(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    t_kill = time.time()
    out, err = proc.communicate(timeout=600)
    return proc.returncode, err, time.time() - t_kill


def test_killed_rank_restarts_and_matches_uninterrupted_run(fmnist, tmp_path):
    kw = dict(epochs=2, batch_size=16, save_every_steps=2)
    r = torchrun(2, "train", *_args(**{**FAST, **kw, "data": fmnist, "output": tmp_path / "ref"}))
    assert r.returncode == 0, r.stderr
    rc, err, _ = _run_and_kill_a_rank(fmnist, tmp_path / "killed", kw, max_restarts=1)
    assert rc == 0, err
    assert "resumed from" in err
    assert_same_run(final_state(tmp_path / "ref"), final_state(tmp_path / "killed"))


def test_killed_rank_without_restarts_fails_fast(fmnist, tmp_path):
    rc, err, seconds = _run_and_kill_a_rank(fmnist, tmp_path / "dead", dict(epochs=3, batch_size=16,
                                                                           save_every_steps=2), max_restarts=0)
    assert rc != 0
    assert seconds < 60, f"took {seconds:.0f} s to notice the dead rank"
    assert "SIGKILL" in err or "Signal 9" in err or "failed" in err.lower()


def test_fsdp_checkpoint_loads_in_one_process(fmnist, tmp_path):
    out = tmp_path / "fsdp"
    r = torchrun(2, "train", *_args(**{**FAST, "data": fmnist, "output": out, "epochs": 1, "batch_size": 16}),
                 "--fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    acc = metrics(out)[-1]["val_acc1"]
    state, _ = read_checkpoint(out / "last.pt")
    assert "stem.conv.weight" in state["model"] and state["model"]["stem.conv.weight"].shape == (40, 3, 4, 4)
    r = cli("eval", "--checkpoint", out / "best.safetensors", "--data", fmnist, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acc1"] == pytest.approx(acc, abs=1e-6)
    # The full, name-keyed state resumes on another world size: here 1 process, unsharded.
    r = cli("train", *_args(**{**FAST, "data": fmnist, "output": out, "epochs": 2, "batch_size": 32,
                               "resume": "auto"}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and [m["epoch"] for m in metrics(out)] == [1, 2]
