"""Data at scale (issue 22): the same images as a folder and as a Hugging Face dataset (`save_to_disk`, parquet
files as a hub snapshot holds them) train to bitwise the same weights, evaluate to the same numbers, and fail in
one line where they do not fit. The datasets are written by the `datasets` library itself."""

import io
import json
import os
import subprocess
import sys

import datasets  # the [data] extra, part of the test install
import numpy as np
import pytest
import torch
from helpers import run_main
from PIL import Image

CLASSES = ["cat", "dog", "fox"]
COLORS = {"cat": (200, 30, 30), "dog": (30, 30, 200), "fox": (30, 200, 30)}


def _png(color, i):
    torch.manual_seed(i)
    noise = (torch.rand(20, 24, 3) * 60).to(torch.uint8)
    img = Image.fromarray((torch.tensor(color, dtype=torch.uint8) // 2 + noise).numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One image set four ways: train/ + validation/ folders, save_to_disk, parquet files, and a copy whose label
    column is plain strings (no ClassLabel)."""
    root = tmp_path_factory.mktemp("sources")
    rows = {"train": [], "validation": []}
    for split, n in (("train", 4), ("validation", 2)):
        for c in CLASSES:
            for i in range(n):
                data = _png(COLORS[c], hash((split, c, i)) % 1000)
                (root / "folder" / split / c).mkdir(parents=True, exist_ok=True)
                (root / "folder" / split / c / f"{i:03d}.png").write_bytes(data)
                rows[split].append((data, c))  # the folder's order: class, then file name
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                               "note": datasets.Value("string")})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b, _ in r], "label": [CLASSES.index(c) for _, c in r],
         "note": ["x"] * len(r)}, features=feats) for s, r in rows.items()})
    dd.save_to_disk(str(root / "disk"))
    (root / "parquet" / "data").mkdir(parents=True)
    for s, d in dd.items():
        d.to_parquet(str(root / "parquet" / "data" / f"{s}-00000-of-00001.parquet"))
    strings = datasets.DatasetDict({s: datasets.Dataset.from_dict(
        {"picture": [{"bytes": b, "path": None} for b, _ in r], "kind": [c for _, c in r]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")}))
        for s, r in rows.items()})
    strings.save_to_disk(str(root / "strings"))
    import webdataset  # the shards as the webdataset library itself writes them, 5 samples a shard

    (root / "shards").mkdir()
    for split, r in rows.items():
        with webdataset.ShardWriter(str(root / "shards" / f"toy-{split}-%06d.tar"), maxcount=5, verbose=0) as sink:
            for i, (b, c) in enumerate(r):
                sink.write({"__key__": f"{split}_{i:04d}", "png": b, "cls": str(CLASSES.index(c))})
    (root / "shards" / "_info.json").write_text(json.dumps({"name": "toy", "classes": CLASSES}))
    return root


TRAIN = ["--model", "convnext_atto", "--epochs", 1, "--batch-size", 4, "--input-size", 32, "--aa", "none", "--mixup",
         0, "--cutmix", 0, "--reprob", 0, "--workers", 0, "--no-progress", "--threads", 1]


def test_a_folder_and_its_hf_datasets_train_to_the_same_weights(sources, tmp_path, capsys):
    runs = {}
    for name, data, extra in (("folder", sources / "folder", []), ("disk", f"hf:{sources / 'disk'}", []),
                              ("parquet", f"hf:{sources / 'parquet'}", []),
                              ("strings", f"hf:{sources / 'strings'}", ["--image-key", "picture", "--label-key", "kind"]),
                              ("shards", f"wds:{sources / 'shards'}", [])):
        code, _, err = run_main(capsys, "train", "--data", data, "--output", tmp_path / name, *TRAIN, *extra)
        assert code == 0, (name, err)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    for name in ("disk", "parquet", "strings", "shards"):
        assert runs[name].keys() == runs["folder"].keys()
        assert all(torch.equal(runs[name][k], runs["folder"][k]) for k in runs["folder"]), name
    from convnext.factory import load_for_inference

    _, info = load_for_inference(tmp_path / "disk" / "best.safetensors")
    assert info.classes == CLASSES  # the ClassLabel's names
    got = {}
    for name, data in (("folder", sources / "folder" / "validation"), ("disk", f"hf:{sources / 'disk'}"),
                       ("parquet", f"hf:{sources / 'parquet'}"), ("shards", f"wds:{sources / 'shards'}")):
        code, out, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "folder" / "best.safetensors", "--data",
                                  data, "--json", "--output", tmp_path / f"eval-{name}")
        assert code == 0, (name, err)
        got[name] = json.loads(out)
    for name in ("disk", "parquet", "shards"):
        assert got[name]["count"] == got["folder"]["count"] == 6
        assert got[name]["acc1"] == got["folder"]["acc1"] and got[name]["loss"] == pytest.approx(got["folder"]["loss"])
    code, out, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "folder" / "best.safetensors", "--data",
                              f"hf:{sources / 'disk'}", "--split", "train", "--json", "--output", tmp_path / "eval-t")
    assert code == 0 and json.loads(out)["count"] == 12, err


@pytest.mark.parametrize("args, needle", [
    (["--train-split", "training"], "has no split 'training' (it has train, validation)"),
    (["--image-key", "photo"], "no image column 'photo' (columns: image, label, note); name it with --image-key"),
    (["--label-key", "tag"], "no label column 'tag' (columns: image, label, note)"),
    (["--label-key", "image"], "the 'image' column holds Image("),
])
def test_an_hf_dataset_that_does_not_fit_is_one_line(sources, tmp_path, capsys, args, needle):
    code, _, err = run_main(capsys, "train", "--data", f"hf:{sources / 'disk'}", "--output", tmp_path / "r", *TRAIN,
                            *args)
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_hub_name_not_in_the_local_cache_is_one_line_and_no_download(sources, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    code, _, err = run_main(capsys, "train", "--data", "hf:someone/no-such-dataset", "--output", tmp_path / "r",
                            *TRAIN)
    assert code == 2 and "hf:someone/no-such-dataset: cannot open it as a Hugging Face dataset" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreadable_image_in_an_hf_dataset_is_skipped_and_named(sources, tmp_path, capsys, caplog):
    d = datasets.load_from_disk(str(sources / "disk"))
    train = d["train"].cast_column("image", datasets.Image(decode=False))
    images = list(train["image"])
    images[1] = {"bytes": b"not a png", "path": None}
    broken = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"image": images, "label": list(train["label"])},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})),
        "validation": d["validation"].remove_columns("note")})
    broken.save_to_disk(str(tmp_path / "broken"))
    code, _, err = run_main(capsys, "train", "--data", f"hf:{tmp_path / 'broken'}", "--output", tmp_path / "r", *TRAIN)
    assert code == 0, err
    assert f"skipping unreadable image hf:{tmp_path / 'broken'}[train]#1" in caplog.text
    assert "UnidentifiedImageError" in caplog.text
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["bad_images"] == 1


def test_the_validation_split_is_found_as_val_or_validation_in_folders(sources, tmp_path, capsys):
    import shutil

    shutil.copytree(sources / "folder" / "train", tmp_path / "d" / "train")
    shutil.copytree(sources / "folder" / "validation", tmp_path / "d" / "val")
    code, _, err = run_main(capsys, "train", "--data", tmp_path / "d", "--output", tmp_path / "r", *TRAIN)
    assert code == 0, err
    code, _, err = run_main(capsys, "train", "--data", tmp_path / "d", "--output", tmp_path / "r2", *TRAIN,
                            "--val-split", "holdout")
    assert code == 2 and "holdout not found" in err


def _shard_args(data, out, *extra):
    return [sys.executable, "-m", "convnext", "train", "--data", str(data), "--output", str(out),
            *map(str, TRAIN), "--epochs", "2", "--save-every-steps", "1", *extra]


@pytest.mark.slow
def test_shards_killed_mid_epoch_resume_to_the_bitwise_run(sources, tmp_path):
    from helpers import assert_same_run, sigkill_when

    from convnext.weights import read_checkpoint

    data = f"wds:{sources / 'shards'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_shard_args(data, tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    sigkill_when(_shard_args(data, out), out / "checkpoints" / "step-00000004.pt", env=env)  # mid epoch 2 (3 a epoch)
    r = subprocess.run(_shard_args(data, out, "--resume", "auto"), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    a, b = read_checkpoint(tmp_path / "ref" / "last.pt")[0], read_checkpoint(out / "last.pt")[0]
    assert a["step"] == 6
    assert_same_run(a, b)


@pytest.mark.slow
def test_two_processes_over_shards_see_each_sample_once_and_equal_one_process(sources, tmp_path):
    from convnext.data import EpochSampler
    from convnext.data.wds import WdsImages

    ds = WdsImages(f"wds:{sources / 'shards'}", "train")
    assert len(ds) == 12 and len(ds.shards) == 3
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = EpochSampler(len(ds), shuffle=True, seed=0, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            seen += [i for _, i in sampler]
        assert sorted(seen) == list(range(12))  # every sample once an epoch, across the two ranks
    base = [*map(str, TRAIN), "--data", f"wds:{sources / 'shards'}", "--epochs", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "convnext", "train", *base, "--output", str(tmp_path / "one"),
                          "--batch-size", "4"], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                          "convnext", "train", *base, "--output", str(tmp_path / "two"), "--batch-size", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_shard_order_visits_one_shard_at_a_time_and_keeps_the_epoch_exact(sources, tmp_path, capsys):
    from convnext.data import EpochSampler
    from convnext.data.wds import WdsImages

    ds = WdsImages(f"wds:{sources / 'shards'}", "train")
    groups = ds.shard_groups()
    assert [len(g) for g in groups] == [5, 5, 2]
    shard_of = {i: k for k, g in enumerate(groups) for i in g}

    def order(epoch, rank=0, world=1, start=0, seed=0):
        sampler = EpochSampler(len(ds), shuffle=True, seed=seed, rank=rank, world_size=world, groups=groups)
        sampler.set_epoch(epoch, start)
        return [i for _, i in sampler]

    orders = [order(e) for e in range(6)]
    for o in orders:
        assert sorted(o) == list(range(12))  # every sample once an epoch
        runs = [shard_of[i] for k, i in enumerate(o) if k == 0 or shard_of[o[k - 1]] != shard_of[i]]
        assert sorted(runs) == [0, 1, 2]  # each shard visited in one stretch
    assert len({tuple(o) for o in orders}) == 6 and order(3) == orders[3]  # shuffled per epoch, from the seed
    assert len({tuple(o[:5]) for o in orders}) > 1 and order(0, seed=1) != orders[0]
    for epoch in range(3):  # two ranks at batch 2 = one process at batch 4, step by step (what DDP needs)
        one, r0, r1 = order(epoch), order(epoch, 0, 2), order(epoch, 1, 2)
        assert sorted(r0 + r1) == list(range(12))
        for step in range(3):
            assert sorted(r0[2 * step:2 * step + 2] + r1[2 * step:2 * step + 2]) == sorted(one[4 * step:4 * step + 4])
    assert order(2, start=7) == orders[2][7:]  # a mid-epoch resume continues the same order
    code, _, err = run_main(capsys, "train", "--data", f"wds:{sources / 'shards'}", "--output", tmp_path / "r", *TRAIN,
                            "--sample-order", "shards")
    assert code == 0, err
    code, _, err = run_main(capsys, "train", "--data", sources / "folder", "--output", tmp_path / "f", *TRAIN,
                            "--sample-order", "shards")
    assert code == 2 and "needs --data wds:DIR" in err
    with pytest.raises(ValueError, match="exactly one group"):
        EpochSampler(12, shuffle=True, seed=0, groups=[[0, 1], [1, 2]])


def test_shards_named_by_brace_patterns_train_as_their_folder(sources, tmp_path, capsys):
    shards = sources / "shards"
    code, _, err = run_main(capsys, "train", "--data", f"wds:{shards}", "--output", tmp_path / "dir", *TRAIN)
    assert code == 0, err
    runs = {"dir": torch.load(tmp_path / "dir" / "last.pt", weights_only=True)["model"]}
    for name, args in (("missing", ["--data", f"wds:{shards}/toy-{{train,validation}}-{{000000..000002}}.tar"]),
                       ("source", ["--data", f"wds:{shards}/toy-{{train-{{000000..000002}},validation-{{000000..000001}}}}.tar"]),
                       ("splits", ["--data", f"wds:{shards}/toy-train-{{000000..000002}}.tar", "--val-split",
                                   "toy-validation-{000000..000001}.tar"])):
        code, _, err = run_main(capsys, "train", *args, "--output", tmp_path / name, *TRAIN)
        if name == "missing":  # toy-validation-000002.tar does not exist
            assert code == 2 and "1 of its 6 shards are not there" in err and "toy-validation-000002.tar" in err
            continue
        assert code == 0, err
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(runs[name][k], runs["dir"][k]) for k in runs["dir"]), name
    code, _, err = run_main(capsys, "train", "--data", f"wds:{shards}/toy-train-{{000000..000002}}.tar", "--output",
                            tmp_path / "noval", *TRAIN)
    assert code == 2 and "hold no split 'validation'" in err and "--val-split 'PATTERN.tar'" in err


def test_a_truncated_shard_keeps_what_it_holds_and_names_the_cut_member(sources, tmp_path, capsys, caplog):
    import shutil

    shutil.copytree(sources / "shards", tmp_path / "shards")
    last = sorted((tmp_path / "shards").glob("toy-train-*.tar"))[-1]
    data = last.read_bytes()
    cut = data.rfind(b"\x89PNG") + 200  # inside the last image
    last.write_bytes(data[:cut])
    code, _, err = run_main(capsys, "train", "--data", f"wds:{tmp_path / 'shards'}", "--output", tmp_path / "r", *TRAIN)
    assert code == 0, err
    assert "skipping unreadable image" in caplog.text and f"{last}:train_0011" in caplog.text
    assert json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])["bad_images"] == 1
    (tmp_path / "shards" / "toy-train-000000.tar").write_bytes(b"garbage" * 100)
    code, _, err = run_main(capsys, "train", "--data", f"wds:{tmp_path / 'shards'}", "--output", tmp_path / "r2",
                            *TRAIN)
    assert code == 2 and "toy-train-000000.tar: not a readable tar shard" in err
    code, _, err = run_main(capsys, "train", "--data", f"wds:{tmp_path / 'shards'}", "--output", tmp_path / "r3",
                            *TRAIN, "--train-split", "test")
    assert code == 2 and "has no shards of split 'test'" in err


def test_data_pack_writes_shards_and_datasets_that_train_as_the_folder(sources, tmp_path, capsys):
    code, out, err = run_main(capsys, "data", "pack", sources / "folder", tmp_path / "wds", "--shard-size", "3KB",
                              "--workers", 1, "--no-progress")
    assert code == 0, err
    info = json.loads((tmp_path / "wds" / "_info.json").read_text())
    assert info["classes"] == CLASSES and info["splits"]["train"]["num_samples"] == 12
    assert len(info["splits"]["train"]["filenames"]) > 1  # 3 KB shards: several
    import hashlib

    for name, sha in info["splits"]["train"]["sha256"].items():
        assert hashlib.sha256((tmp_path / "wds" / name).read_bytes()).hexdigest() == sha
    code, _, err = run_main(capsys, "data", "pack", sources / "folder", tmp_path / "hf", "--format", "hf",
                            "--workers", 2, "--no-progress")
    assert code == 0, err
    code, out, _ = run_main(capsys, "data", "info", f"wds:{tmp_path / 'wds'}", "--json")
    assert json.loads(out)["splits"] == {"train": 12, "validation": 6}
    code, out, _ = run_main(capsys, "data", "info", f"hf:{tmp_path / 'hf'}")
    assert code == 0 and "3 classes (cat, dog, fox)" in out and "validation: 6 images" in out
    code, out, _ = run_main(capsys, "data", "info", sources / "folder")
    assert code == 0 and "train: 12 images" in out
    weights = {}
    for name, data in (("wds", f"wds:{tmp_path / 'wds'}"), ("hf", f"hf:{tmp_path / 'hf'}"),
                       ("folder", sources / "folder")):
        code, _, err = run_main(capsys, "train", "--data", data, "--output", tmp_path / f"run-{name}", *TRAIN)
        assert code == 0, err
        weights[name] = torch.load(tmp_path / f"run-{name}" / "last.pt", weights_only=True)["model"]
    for name in ("wds", "hf"):
        assert all(torch.equal(weights[name][k], weights["folder"][k]) for k in weights["folder"]), name
    code, _, err = run_main(capsys, "data", "pack", sources / "folder", tmp_path / "wds", "--no-progress")
    assert code == 2 and "exists: pass --force" in err
    code, _, err = run_main(capsys, "data", "pack", sources / "folder", sources / "folder" / "x", "--no-progress")
    assert code == 2 and "inside" in err


def test_a_killed_pack_leaves_no_output_and_no_partial_shard(sources, tmp_path):
    import signal
    import time

    big = tmp_path / "big" / "train" / "cat"
    big.mkdir(parents=True)
    for i in range(400):
        Image.new("RGB", (300, 200), (i % 255, 10, 10)).save(big / f"{i:04d}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "convnext", "data", "pack", str(tmp_path / "big"),
                             str(tmp_path / "out"), "--shard-size", "200KB", "--resize-short", "100", "--workers", "1",
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not list(tmp_path.glob(".out.partial-*/*-000002.tar")):  # a few shards written
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()  # nothing a reader would take for a pack
    r = subprocess.run([sys.executable, "-m", "convnext", "data", "pack", str(tmp_path / "big"), str(tmp_path / "out"),
                        "--shard-size", "200KB", "--resize-short", "100", "--workers", "1", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".out.partial-*"))  # the killed pack's folder removed by the next
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 400
    from convnext.data.wds import WdsImages

    ds = WdsImages(f"wds:{tmp_path / 'out'}", "train")
    assert len(ds) == 400 and max(ds[i][0].size for i in (0, 399)) == (150, 100)  # shorter side 100, as JPEG


def test_bench_data_times_each_source_and_worker_count(sources, tmp_path, capsys):
    code, out, err = run_main(capsys, "bench", "--mode", "data", "--data",
                              f"{sources / 'folder'},wds:{sources / 'shards'},hf:{sources / 'disk'}", "--workers", "0",
                              "--batch-size", 2, "--batches", 2, "--repeats", 1, "--input-size", 32, "--json", "-")
    assert code == 0, err
    res = json.loads(out)
    assert [r["source"] for r in res["rows"]] == [str(sources / "folder"), f"wds:{sources / 'shards'}",
                                                  f"hf:{sources / 'disk'}"]
    assert all(r["img_s"] > 0 for r in res["rows"]) and res["rows"][0]["ratio"] == 1.0
    code, out, err = run_main(capsys, "bench", "--mode", "data", "--data", f"wds:{sources / 'shards'},hf:{sources / 'disk'}",
                              "--decode", "cpu,cpu-draft", "--batch-size", 2, "--batches", 2, "--repeats", 1,
                              "--input-size", 32)
    assert code == 0 and out.count("cpu-draft") == 4, err  # two progress lines, two rows
    code, _, err = run_main(capsys, "bench", "--mode", "data", "--workers", "0")
    assert code == 2 and "--mode data and --data" in err
    code, _, err = run_main(capsys, "bench", "--mode", "data", "--data", sources / "folder", "--decode", "gpu")
    assert code == 2 and "gpu needs a CUDA device" in err


# --- imbalanced data: class weights, the balanced sampler ------------------------------------------------------
def test_the_balanced_sampler_draws_classes_evenly_seeded_distributed_and_resumable():
    from convnext.data import EpochSampler

    targets = [0] * 90 + [1] * 9 + [2] * 1
    counts = {0: 90, 1: 9, 2: 1}
    weights = [1.0 / counts[t] for t in targets]
    drawn = torch.zeros(3)
    sampler = EpochSampler(100, shuffle=True, seed=7, weights=weights)
    for epoch in range(200):
        sampler.set_epoch(epoch)
        for _, i in sampler:
            drawn[targets[i]] += 1
    expected, sd = 20000 / 3, (20000 * (1 / 3) * (2 / 3)) ** 0.5
    assert ((drawn - expected).abs() < 5 * sd).all(), drawn  # each class a third, within 5 standard deviations
    again = EpochSampler(100, shuffle=True, seed=7, weights=weights)
    again.set_epoch(3)
    sampler.set_epoch(3)
    order = [i for _, i in sampler]
    assert [i for _, i in again] == order  # seeded by (seed, epoch)
    again.set_epoch(3, start=40)
    assert [i for _, i in again] == order[40:] and len(again) == 60  # a mid-epoch resume continues the draw
    shares = []
    for rank in range(3):
        s = EpochSampler(100, shuffle=True, seed=7, weights=weights, rank=rank, world_size=3)
        s.set_epoch(3)
        shares.append([i for _, i in s])
    assert all(len(s) == 34 for s in shares)  # padded to a multiple of the processes, as DistributedSampler
    assert sorted(i for s in shares for i in s) == sorted(order + order[:2])  # the one draw, shared out
    with pytest.raises(ValueError, match="one per sample"):
        EpochSampler(3, shuffle=True, seed=0, weights=[1.0, -1.0, 0.0])


def test_class_weights_auto_are_sklearns_balanced_and_files_are_checked(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from convnext.data import DataError
    from convnext.data.folder import class_weights

    targets = [0] * 6 + [1] * 3 + [2] * 1
    want = compute_class_weight("balanced", classes=np.arange(3), y=np.array(targets))
    torch.testing.assert_close(class_weights("auto", targets, CLASSES), torch.tensor(want, dtype=torch.float32))
    (tmp_path / "w.txt").write_text("fox,3\ncat,1\ndog,2\n")
    assert class_weights(str(tmp_path / "w.txt"), targets, CLASSES).tolist() == [1.0, 2.0, 3.0]
    (tmp_path / "w.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match="2 weights for 3 classes"):
        class_weights(str(tmp_path / "w.txt"), targets, CLASSES)


def test_training_with_class_weights_and_the_balanced_sampler(sources, tmp_path, capsys):
    from convnext.train.classification import ClassificationTask
    from convnext.train.config import ClassifyConfig

    code, _, err = run_main(capsys, "train", "--data", sources / "folder", "--output", tmp_path / "r", *TRAIN,
                            "--class-weights", "auto", "--balanced-sampler")
    assert code == 0, err
    (tmp_path / "w.txt").write_text("1\n2\n4\n")
    task = ClassificationTask(ClassifyConfig(model="convnext_atto", data=str(sources / "folder"), input_size=32,
                                             smoothing=0.1, class_weights=str(tmp_path / "w.txt"), mixup=0, cutmix=0))
    task.datasets()
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits

    from convnext.data import Batch

    loss = task.loss(Fixed(), Batch(torch.zeros(6, 3, 8, 8), targets, list(range(6))), torch.device("cpu"))["loss"]
    torch.testing.assert_close(loss, torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2, 4]),
                                                               label_smoothing=0.1)(logits, targets))
    code, _, err = run_main(capsys, "train", "--data", sources / "folder", "--output", tmp_path / "r2", *TRAIN,
                            "--class-weights", "balanced")
    assert code == 2 and "--class-weights balanced: auto, or a file" in err


# --- several classes per image ----------------------------------------------------------------------------------
def test_average_precision_and_f1_equal_sklearns_on_known_scores():
    from sklearn.metrics import average_precision_score, f1_score

    from convnext.eval.metrics import average_precision

    torch.manual_seed(0)
    targets = (torch.rand(50, 4) > 0.6).float()
    scores = torch.where(targets > 0, torch.rand(50, 4) * 0.7 + 0.3, torch.rand(50, 4) * 0.8)
    scores[:10, 0] = 0.5  # ties
    targets[:, 3] = 0  # a class without positives: NaN, left out of the mean
    ap = average_precision(scores, targets)
    for c in range(3):
        assert ap[c].item() == pytest.approx(average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()),
                                             abs=1e-12)
    assert torch.isnan(ap[3])
    from convnext.eval.metrics import evaluate_multi_label

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.logit(scores[: len(x)].clamp(1e-6, 1 - 1e-6))

    from convnext.data import Batch

    res = evaluate_multi_label(Fixed(), [Batch(torch.zeros(50, 3, 4, 4), targets, list(range(50)))],
                               torch.device("cpu"), 4)
    assert res["mAP"] == pytest.approx(100 * float(ap[:3].mean()))
    want_f1 = f1_score(targets.numpy(), (scores >= 0.5).numpy(), average=None, zero_division=0)
    assert res["per_class_f1"] == pytest.approx(list(want_f1))  # (class 3: false positives only, F1 0)


TAGS = ["blue", "green", "red"]


def _tagged(tmp_path):
    """Colour squares tagged by their channels: a flat folder with train.csv (a;b) and val.jsonl (lists), the same
    as an hf dataset with a List(ClassLabel) column and as wds shards with .json lists."""
    data = tmp_path / "flat"
    data.mkdir()
    rows = {"train": [], "val": []}
    for split, n in (("train", 12), ("val", 6)):
        for i in range(n):
            tags = [t for t, on in (("red", i % 2 == 0), ("blue", i % 3 == 0), ("green", i % 2 == 1)) if on]
            color = (200 if "red" in tags else 20, 200 if "green" in tags else 20, 200 if "blue" in tags else 20)
            Image.new("RGB", (24, 24), color).save(data / f"{split}_{i}.png")
            rows[split].append((f"{split}_{i}.png", tags))
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{f},{';'.join(t)}\n" for f, t in rows["train"]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"path": f, "label": t}) + "\n" for f, t in rows["val"]))
    feats = datasets.Features({"image": datasets.Image(), "tags": datasets.Sequence(datasets.ClassLabel(names=TAGS))})
    datasets.DatasetDict({("validation" if s == "val" else s): datasets.Dataset.from_dict(
        {"image": [{"bytes": (data / f).read_bytes(), "path": None} for f, _ in r],
         "tags": [[TAGS.index(t) for t in tags] for _, tags in r]}, features=feats)
        for s, r in rows.items()}).save_to_disk(str(tmp_path / "hf"))
    import webdataset

    (tmp_path / "wds").mkdir()
    for s, r in rows.items():
        with webdataset.ShardWriter(str(tmp_path / "wds" / f"tags-{s}-%04d.tar"), maxcount=100, verbose=0) as sink:
            for i, (f, tags) in enumerate(r):
                sink.write({"__key__": f"{s}{i:03d}", "png": (data / f).read_bytes(),
                            "json": json.dumps({"label": tags}).encode()})
    (tmp_path / "wds" / "_info.json").write_text(json.dumps({"classes": TAGS}))
    return data


def test_multi_label_training_from_a_labels_file(tmp_path, capsys):
    data = _tagged(tmp_path)
    base = ["train", "--data", data, "--labels", tmp_path / "train.csv", "--val-labels", tmp_path / "val.jsonl",
            "--model", "convnext_atto", "--epochs", 2, "--batch-size", 4, "--input-size", 32, "--aa", "none",
            "--reprob", 0, "--workers", 0, "--no-progress", "--threads", 1]
    code, _, err = run_main(capsys, *base, "--output", tmp_path / "r", "--multi-label", "--mixup", 0, "--cutmix", 0,
                            "--class-weights", "auto", "--smoothing", 0.1)
    assert code == 0, err
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_mAP", "val_f1", "val_loss"} <= set(line) and 0 <= line["val_mAP"] <= 100
    from convnext.factory import load_for_inference

    _, info = load_for_inference(tmp_path / "r" / "best.safetensors")
    assert info.classes == ["blue", "green", "red"] and info.multi_label
    for f in ("best.safetensors", "last.pt"):  # convnext eval scores it as training's validation did
        code, out, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "r" / f, "--data", data, "--labels",
                                  tmp_path / "val.jsonl", "--json", "--output", tmp_path / "e")
        assert code == 0, err
        res = json.loads(out)
        assert res["count"] == 6 and len(res["per_class_f1"]) == 3
        if f == "best.safetensors":
            best = max(json.loads(x)["val_mAP"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
            assert res["mAP"] == pytest.approx(best, abs=1e-6)
    code, out, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "r" / "best.safetensors", "--data", data,
                              "--labels", tmp_path / "val.jsonl", "--output", tmp_path / "e")
    assert code == 0 and "mAP" in out and "  red" in out
    _check_multi_label_predict(capsys, data, tmp_path / "r" / "best.safetensors")
    code, _, err = run_main(capsys, *base, "--output", tmp_path / "r2", "--multi-label", "--epochs", 1)  # Mixup/CutMix on
    assert code == 0, err
    code, _, err = run_main(capsys, *base, "--output", tmp_path / "r3", "--mixup", 0, "--cutmix", 0)
    assert code == 2 and "train.csv:2: a list of labels; pass --multi-label" in err  # `a;b` without --multi-label


def _check_multi_label_predict(capsys, data, checkpoint):
    """`convnext predict` of a multi-label classifier: the classes whose sigmoid is over the threshold."""
    from convnext.data import load_rgb
    from convnext.factory import InferenceInfo, load_for_inference

    model, info = load_for_inference(checkpoint)
    images = [data / f"val_{i}.png" for i in range(6)]
    with torch.no_grad():
        probs = model(torch.stack([info.transform()(load_rgb(p)) for p in images])).sigmoid()
    for threshold in (0.5, float(probs.median())):
        code, out, err = run_main(capsys, "predict", *images, "--checkpoint", checkpoint, "--json", "--no-optimize",
                                  *(["--threshold", threshold] if threshold != 0.5 else []))
        assert code == 0, err
        for row, p in zip(json.loads(out), probs, strict=True):
            want = sorted((i for i in range(3) if p[i] >= threshold), key=lambda i: -p[i])
            assert [t["index"] for t in row["top"]] == want and row["threshold"] == threshold
            assert [t["probability"] for t in row["top"]] == pytest.approx([float(p[i]) for i in want], abs=1e-6)
    code, out, _ = run_main(capsys, "predict", images[0], "--checkpoint", checkpoint, "--threshold", 0.999999)
    assert code == 0 and "no class at 99.9999% or more" in out
    code, _, err = run_main(capsys, "predict", images[0], "--checkpoint", checkpoint, "--threshold", 1.5)
    assert code == 2 and "--threshold must be between 0 and 1" in err
    assert InferenceInfo.from_dict(info.to_dict()).multi_label  # exported files say so too
    single = InferenceInfo("convnext_atto", ["a", "b"])
    assert "multi_label" not in single.to_dict() and not InferenceInfo.from_dict(single.to_dict()).multi_label


def test_mixup_and_cutmix_mix_multi_hot_targets_as_probability_vectors():
    from convnext.data import mixup_cutmix

    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    images = torch.rand(3, 3, 8, 8)
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        torch.manual_seed(0)
        mixed_images, mixed = mixup_cutmix(4, mixup=mixup, cutmix=cutmix)(images, targets)
        lam = float(mixed[0, 0])  # sample 0 has class 0, sample 2 (rolled onto it) has not
        assert 0 < lam < 1 and torch.allclose(mixed, lam * targets + (1 - lam) * targets.roll(1, 0))
        if mixup:
            assert torch.allclose(mixed_images, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_multi_label_hf_lists_and_wds_json_lists_train_as_the_labels_file(tmp_path, capsys):
    data = _tagged(tmp_path)
    common = ["--model", "convnext_atto", "--epochs", 1, "--batch-size", 4, "--input-size", 32, "--aa", "none",
              "--reprob", 0, "--workers", 0, "--no-progress", "--threads", 1, "--multi-label", "--mixup", 0,
              "--cutmix", 0]
    runs = {}
    for name, args in (("files", ["--data", data, "--labels", tmp_path / "train.csv", "--val-labels",
                                  tmp_path / "val.jsonl"]),
                       ("hf", ["--data", f"hf:{tmp_path / 'hf'}", "--label-key", "tags"]),
                       ("wds", ["--data", f"wds:{tmp_path / 'wds'}"])):
        code, _, err = run_main(capsys, "train", *args, *common, "--output", tmp_path / name)
        assert code == 0, (name, err)
        runs[name] = torch.load(tmp_path / name / "last.pt", weights_only=True)["model"]
    for name in ("hf", "wds"):
        assert all(torch.equal(runs[name][k], runs["files"][k]) for k in runs["files"]), name
    code, _, err = run_main(capsys, "train", "--data", f"wds:{tmp_path / 'wds'}", *common[:-5], "--mixup", 0,
                            "--cutmix", 0, "--output", tmp_path / "single")
    assert code == 2 and "pass --multi-label" in err
