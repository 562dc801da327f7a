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
    for a, b in zip(m1, m2, strict=True):
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
    # torchrun's failure report names the killed worker (rank 1) and its signal as the root cause
    cause = err[err.index("Root Cause"):]
    assert "rank      : 1 (local_rank: 1)" in cause and "exitcode  : -9" in cause and "SIGKILL" in cause, err[-3000:]


def test_fsdp_equals_one_process_resumes_and_loads_in_one_process(fmnist, tmp_path):
    """FSDP (2 x 16) trains to the weights of one process (32) within float noise; its mid-epoch checkpoint
    resumes under FSDP to the same run bitwise; its name-keyed `last.pt` resumes in one process; eval reads
    its best."""
    import shutil

    run = {**FAST, "data": fmnist, "epochs": 2, "save_every_steps": 3, "keep_checkpoints": 10}
    ref = cli("train", *_args(**{**run, "output": tmp_path / "ref", "batch_size": 32}))
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "fsdp"
    r = torchrun(2, "train", *_args(**{**run, "output": out, "batch_size": 16}), "--fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "ref"), metrics(out), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_acc1"] == pytest.approx(b["val_acc1"], abs=1.01)  # at most one image flips
    one, sharded = final_state(tmp_path / "ref"), final_state(out)
    assert sharded["model"]["stem.conv.weight"].shape == (40, 3, 4, 4)  # whole tensors, by name
    for k in one["model"]:
        torch.testing.assert_close(one["model"][k], sharded["model"][k], atol=1e-4, rtol=1e-3)
    # FSDP resume: only the checkpoint of step 12 (epoch 2, batch 3) in a fresh folder
    (tmp_path / "again" / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "step-00000012.pt", tmp_path / "again" / "checkpoints")
    r = torchrun(2, "train", *_args(**{**run, "output": tmp_path / "again", "batch_size": 16, "resume": "auto"}),
                 "--fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step 12)" in r.stderr
    assert_same_run(final_state(out), final_state(tmp_path / "again"))
    r = cli("eval", "--checkpoint", out / "best.safetensors", "--data", fmnist, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acc1"] == pytest.approx(max(m["val_acc1"] for m in metrics(out)), abs=1e-6)
    # The full state resumes on another world size: here 1 process, unsharded, one more epoch.
    r = cli("train", *_args(**{**run, "output": out, "epochs": 3, "batch_size": 32, "resume": "auto"}))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "(epoch 3, batch 0, step 18)" in r.stderr
    assert [m["epoch"] for m in metrics(out)] == [1, 2, 3]


# --- Several nodes: two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1) -----

MULTI = dict(epochs=4, batch_size=16, save_every_steps=2, resume="auto")  # 36 steps: time to kill at step 4


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(port, node_rank, max_restarts, fmnist, output):
    """One node: a torchrun agent with one worker, in its own session (so that a test can kill the node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
           "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", "convnext-multinode", f"--max-restarts={max_restarts}", "-m", "convnext", "train",
           *_args(**{**FAST, **MULTI, "data": fmnist, "output": output})]
    # A node that comes back is a new agent: torch's shared rendezvous TCPStore only announces its address in
    # the first round (dynamic_rendezvous caches it on rank 0), so a replacement would wait for it forever.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _two_nodes(fmnist, output, max_restarts):
    import socket

    port = _free_port()
    first = _node(port, 0, max_restarts, fmnist, output)
    t0 = time.time()
    while True:  # the first agent hosts the rendezvous store: start the second once it listens
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert first.poll() is None and time.time() - t0 < 60, first.stderr.read()
        time.sleep(0.1)
    return port, first, _node(port, 1, max_restarts, fmnist, output)


def _worker_env(agent_pid):
    t0 = time.time()
    while not _children(agent_pid):  # the torchrun agent's one worker
        assert time.time() - t0 < 120, "the worker did not start"
        time.sleep(0.1)
    (worker,) = _children(agent_pid)
    env = dict(kv.split("=", 1) for kv in open(f"/proc/{worker}/environ").read().split("\0") if "=" in kv)
    return int(env["RANK"]), int(env["GROUP_RANK"])


@pytest.fixture(scope="module")
def one_node_two_procs(fmnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref2") / "run"
    r = torchrun(2, "train", *_args(**{**FAST, **MULTI, "data": fmnist, "output": out}))
    assert r.returncode == 0, r.stderr[-3000:]
    return final_state(out)


def test_two_nodes_train_to_the_weights_of_one_node_with_two_processes(fmnist, tmp_path, one_node_two_procs):
    _, a, b = _two_nodes(fmnist, tmp_path / "run", max_restarts=0)
    for p in (a, b):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(one_node_two_procs, final_state(tmp_path / "run"))


def _kill_the_node_of_rank_1(first, second, output):
    victim = next(p for p in (first, second) if _worker_env(p.pid)[0] == 1)
    node = _worker_env(victim.pid)[1]
    t0 = time.time()
    while not (output / "checkpoints" / "step-00000004.pt").exists():
        assert first.poll() is None and second.poll() is None and time.time() - t0 < 300
        time.sleep(0.01)
    doomed, todo = [], [victim.pid]
    while todo:  # the whole node: its agent and every process under it (workers run in sessions of their own)
        pid = todo.pop()
        doomed.append(pid)
        todo += _children(pid)
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    return victim, node, time.time()


def test_a_lost_node_stops_the_other_promptly_and_is_named(fmnist, tmp_path):
    _, first, second = _two_nodes(fmnist, tmp_path / "run", max_restarts=0)
    victim, node, t_kill = _kill_the_node_of_rank_1(first, second, tmp_path / "run")
    survivor = second if victim is first else first
    _, err = survivor.communicate(timeout=300)
    seconds = time.time() - t_kill
    assert survivor.returncode != 0
    print(f"the surviving node stopped {seconds:.1f} s after the other node was killed")
    assert seconds < 60, f"the surviving node took {seconds:.0f} s to stop"
    assert f"a collective failed on rank 0: lost node {node} (" in err and "rank 1)" in err, err[-3000:]


def test_max_restarts_on_both_nodes_resume_bitwise(fmnist, tmp_path, one_node_two_procs):
    port, first, second = _two_nodes(fmnist, tmp_path / "run", max_restarts=1)
    victim, node, _ = _kill_the_node_of_rank_1(first, second, tmp_path / "run")
    survivor = second if victim is first else first
    replacement = _node(port, node, 1, fmnist, tmp_path / "run")  # the node comes back and rejoins
    for p in (survivor, replacement):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(one_node_two_procs, final_state(tmp_path / "run"))


def test_a_rank_whose_batch_is_all_unreadable_images_keeps_in_step(fmnist, tmp_path):
    """Batch 1 per process and two thirds of the training images unreadable: at most steps one rank's batch is
    empty while the other's is not. Every rank still runs the backward DDP all-reduces in (the empty one
    backwards its last good batch weighted 0), so the run ends instead of hanging, and counts each image."""
    import shutil

    data = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("Bag", "Coat"):
            (data / split / cls).mkdir(parents=True)
            for f in sorted((fmnist / split / cls).iterdir())[:n]:
                shutil.copy(f, data / split / cls)
    for i in range(16):
        (data / "train" / ("Bag", "Coat")[i % 2] / f"broken{i:02d}.png").write_bytes(b"not an image %d" % i)
    kw = {**FAST, "data": data, "output": tmp_path / "run", "epochs": 2, "batch_size": 1, "max_bad_fraction": 0.9,
          "warmup_epochs": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "convnext",
           "train", *_args(**kw)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180,  # ~10 s; before the fix it hung
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = metrics(tmp_path / "run")
    assert [m["bad_images"] for m in lines] == [16, 16]  # per epoch, over both processes
    assert all(m["train_loss"] == m["train_loss"] for m in lines)  # finite: the stand-ins weigh nothing
