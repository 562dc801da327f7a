"""Trust, round 3: never lose a user's file, never mix two runs, one line for every mistake.

One test (or a few) per letter of the issue, each failing on the code before it. Commands run in this
process (`helpers.run_main`: the CLI's own `main`, exit code and words) unless the exit code of a real
process is the point.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convnext
from convnext.data import DataError

from helpers import one_line, run_main
from test_train import FAST, _args, fmnist, train  # noqa: F401  (fmnist is a fixture)

pytestmark = pytest.mark.timeout(600)


def tiny_folder(root: Path, n: int = 4, classes=("cat", "dog"), size: int = 32) -> Path:
    g = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def train_args(data, out, **kw):
    return ["train", *_args(**{**FAST, "batch_size": 4, "data": data, "output": out, "epochs": 1, **kw})]


@pytest.fixture
def tiny(tmp_path):
    return tiny_folder(tmp_path / "data")


# --- A. generated folders: only ours are ever removed ----------------------------------------------

def test_the_demo_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    thesis = tmp_path / "u" / "data" / "thesis.txt"
    thesis.parent.mkdir(parents=True)
    thesis.write_text("four years of work")
    code, _, err = run_main(capsys, "demo", "--output", tmp_path / "u", "--per-class", 2, "--epochs", 1)
    assert code == 2 and "was not written by convnext" in one_line(err) and "nothing was removed" in err
    assert thesis.read_text() == "four years of work"


def test_write_once_replaces_only_its_own_folders(tmp_path):
    from convnext.data.folder import write_once

    def build(tmp):
        (tmp / "a.txt").write_text("x")

    root = write_once(tmp_path / "gen", "v1", build)
    assert (root / "a.txt").is_file()
    assert write_once(tmp_path / "gen", "v2", build) == root  # ours (marked): rebuilt for another marker
    (tmp_path / "gen.partial").mkdir()
    (tmp_path / "gen.partial" / "notes.md").write_text("mine")  # a user's folder that happens to be named so
    with pytest.raises(DataError, match="not written by convnext"):
        write_once(tmp_path / "gen", "v3", build)
    assert (tmp_path / "gen.partial" / "notes.md").read_text() == "mine"


def test_a_demo_slice_smaller_than_a_batch_runs(tmp_path, capsys, monkeypatch):
    import convnext.data.fashion_mnist as fm

    real = fm.prepare
    monkeypatch.setattr(fm, "prepare", lambda root, per_class=None: real(tmp_path / "fm", per_class=per_class))
    code, out, err = run_main(capsys, "demo", "--output", tmp_path / "d", "--per-class", 2, "--epochs", 1)
    assert code == 0, err
    assert "demo result" in out and "--batch-size" not in err


# --- B. --force never removes what the command reads -----------------------------------------------

def test_force_keeps_the_files_the_run_reads(tiny, tmp_path, capsys, caplog):
    out = tmp_path / "r"
    assert run_main(capsys, *train_args(tiny, out))[0] == 0
    before = convnext.create_model("convnext_atto", pretrained=out / "best.safetensors").state_dict()
    with caplog.at_level("INFO"):
        code, _, err = run_main(capsys, *train_args(tiny, out, finetune=out / "best.safetensors", lr=1e-12),
                                "--force")
    assert code == 0, err
    assert "keeping" in caplog.text and "this run reads it" in caplog.text
    after = torch.load(out / "last.pt", weights_only=True)["model"]  # fine-tuned from it, at lr 1e-12
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in before.items() if not k.startswith("head.fc"))


# --- C. --resume auto finds last.pt, and never starts fresh over an earlier run ---------------------

def test_resume_auto_resumes_from_last_pt_when_the_step_files_are_gone(tiny, tmp_path, capsys, caplog):
    import shutil

    out = tmp_path / "r"
    assert run_main(capsys, *train_args(tiny, out, epochs=2, keep_checkpoints=1))[0] == 0
    shutil.rmtree(out / "checkpoints")
    with caplog.at_level("INFO"):
        code, _, err = run_main(capsys, *train_args(tiny, out, epochs=3, resume="auto"))
    assert code == 0, err
    assert "resumed from" in caplog.text and "last.pt" in caplog.text
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_resume_auto_refuses_to_start_fresh_over_an_earlier_run(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_main(capsys, *train_args(tiny, out, keep_checkpoints=1))[0] == 0
    for p in out.glob("checkpoints/*.pt"):
        p.unlink()
    (out / "last.pt").write_bytes(b"damaged")
    metrics = (out / "metrics.jsonl").read_text()
    code, _, err = run_main(capsys, *train_args(tiny, out, resume="auto"))
    assert code == 2 and "none of its checkpoints loads" in one_line(err)
    assert (out / "metrics.jsonl").read_text() == metrics and (out / "best.safetensors").is_file()


# --- D. symlinks: files followed, loops and folders outside the class never -------------------------

def test_a_symlink_loop_is_not_followed_and_is_reported(tiny, tmp_path, caplog):
    from convnext.data import ImageFolder

    os.symlink("..", tiny / "train" / "cat" / "loop")  # cat/loop -> train/ (holds dog/ too)
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside)
    os.symlink(outside, tiny / "train" / "dog" / "linked.png")  # a symlinked file: followed
    with caplog.at_level("WARNING"):
        ds = ImageFolder(tiny / "train")
    assert len(ds) == 9 and sum(t == 0 for _, t in ds.samples) == 4  # 4 cats, 4 + 1 dogs; nothing counted twice
    assert "not followed 1 symlinked folder" in caplog.text and "loop" in caplog.text


# --- E. dense predict: one output per input, never over another ------------------------------------

@pytest.fixture
def segmenter_file(tmp_path):
    from convnext.dense import create_segmenter
    from convnext.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from convnext.weights import write_model_file

    model = create_segmenter("convnext_atto", 3, head="fpn", aux_head=False, channels=16)
    spec = {"model_name": "convnext_atto", "head": "fpn", "aux_head": False, "channels": 16, "classes": ["a", "b", "c"],
            "input_size": 64, "reduce_zero_label": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    path = tmp_path / "seg.safetensors"
    write_model_file(path, "segment", spec, model.state_dict())
    return path


def test_dense_predict_writes_every_output_and_none_over_another(segmenter_file, tmp_path, capsys):
    inputs = [tmp_path / "in" / n for n in ("a/x.png", "b/x.png", "a/x.jpg", "a/x_mask.png")]
    for p in inputs:
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(p)
    code, out, err = run_main(capsys, "segment", "predict", *inputs, "--checkpoint", segmenter_file, "--output",
                              tmp_path / "p", "--json")
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    written = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*.png"))
    assert len(rows) == 4 and len(written) == 8 and len({r["output"] for r in rows}) == 4
    assert "a/x_mask.png" in written and "a/x_mask_png.png" in written  # x.jpg's mask and x_mask.png's overlay


# --- F. eval: no silent overwrite, never into the data ---------------------------------------------

def test_eval_keeps_an_earlier_plot_and_never_writes_into_the_data(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    assert run_main(capsys, *train_args(tiny, out))[0] == 0  # (fit writes no confusion matrix)
    ckpt = out / "best.safetensors"
    assert run_main(capsys, "eval", "--checkpoint", ckpt, "--data", tiny)[0] == 0
    png = (out / "confusion_matrix.png").read_bytes()
    code, _, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", tiny)
    assert code == 2 and "pass --force" in one_line(err) and (out / "confusion_matrix.png").read_bytes() == png
    assert run_main(capsys, "eval", "--checkpoint", ckpt, "--data", tiny, "--force")[0] == 0
    code, _, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", tiny, "--output", tiny / "val")
    assert code == 2 and "inside --data" in one_line(err)
    assert not (tiny / "val" / "confusion_matrix.png").exists()
    code, _, err = run_main(capsys, "pretrain", "--model", "convnextv2_atto", "--data", tiny, "--output",
                            tiny / "runs")
    assert code == 2 and "inside --data" in one_line(err)


# --- G. resume: another run's checkpoint is refused --------------------------------------------------

def test_resume_refuses_another_batch_size_data_or_seed(tiny, tmp_path, capsys, caplog):
    out = tmp_path / "r"
    assert run_main(capsys, *train_args(tiny, out, save_every_steps=1, keep_checkpoints=9))[0] == 0
    mid = out / "checkpoints" / "step-00000001.pt"  # 2 steps per epoch: mid-epoch
    code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r2", resume=mid, batch_size=2))
    assert code == 2 and "batch_size 4 -> 2" in one_line(err) and "--resume-anyway" in err
    code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r3", resume=mid, seed=1))
    assert code == 2 and "seed 0 -> 1" in one_line(err)
    (tiny / "train" / "cat" / "3.png").unlink()
    code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r4", resume=mid))
    assert code == 2 and "the data (samples 8 -> 7)" in one_line(err)
    with caplog.at_level("WARNING"):
        code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r5", resume=mid), "--resume-anyway")
    assert code == 0, err
    assert "--resume-anyway: resuming" in caplog.text


# --- H. one run per output folder --------------------------------------------------------------------

def test_a_second_run_into_a_busy_output_is_refused_and_a_stale_lock_taken_over(tiny, tmp_path, capsys):
    import socket

    out = tmp_path / "r"
    out.mkdir()
    lock = out / ".convnext.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: this very process
    code, _, err = run_main(capsys, *train_args(tiny, out))
    assert code == 2 and f"in use by a training run (process {os.getpid()}" in one_line(err)
    assert not (out / "metrics.jsonl").exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))  # its process is gone
    assert run_main(capsys, *train_args(tiny, out))[0] == 0
    assert not lock.exists()  # released at the end


@pytest.mark.slow
def test_two_concurrent_runs_into_one_output_cannot_both_run(tiny, tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "convnext", *map(str, train_args(tiny, out, epochs=30))]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / ".convnext.lock").exists():
            assert first.poll() is None
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "in use by a training run" in second.stderr
    finally:
        first.kill()
        first.wait()


# --- I. total failure is a failure: exit 1 -----------------------------------------------------------

def test_an_epoch_without_a_readable_image_fails_with_exit_1(tiny, tmp_path, capsys):
    for p in (tiny / "train").rglob("*.png"):
        p.write_bytes(b"not an image")
    code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r"))
    assert code == 1 and "not one usable image" in one_line(err)
    assert not (tmp_path / "r" / "best.safetensors").exists()


def test_more_unreadable_images_than_the_limit_fail(tiny, tmp_path, capsys):
    for p in sorted((tiny / "train").rglob("*.png"))[:3]:
        p.write_bytes(b"not an image")
    code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r", max_bad_fraction=0.25))
    assert code == 1 and "3 of 8 images were unreadable" in one_line(err)
    assert run_main(capsys, *train_args(tiny, tmp_path / "r2"))[0] == 0  # 3 of 8 is within the default 0.5


# --- J. non-finite weights are refused ----------------------------------------------------------------

def test_non_finite_weights_are_refused_by_eval_predict_and_export(tiny, tmp_path, capsys):
    model = convnext.create_model("convnext_atto", num_classes=2)
    with torch.no_grad():
        model.stages[1].blocks[0].pwconv1.weight[0, 0] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    convnext.save_checkpoint(model, ckpt, classes=["cat", "dog"])
    image = next((tiny / "val").rglob("*.png"))
    for args in (("eval", "--checkpoint", ckpt, "--data", tiny), ("predict", image, "--checkpoint", ckpt),
                 ("export", "--checkpoint", ckpt, "--format", "torchscript", "--output", tmp_path / "m.pt")):
        code, _, err = run_main(capsys, *args)
        assert code == 2 and "stages.1.blocks.0.pwconv1.weight holds NaN" in one_line(err), args
    assert not (tmp_path / "m.pt").exists()


# --- K. one named loss (segmentation without its auxiliary head) ----------------------------------------

def test_segment_train_without_the_auxiliary_head(tmp_path, capsys):
    from convnext.data.scenes import SceneSpec, write_scenes

    data = write_scenes(tmp_path / "seg", "segment", n_train=4, n_val=2,
                        spec=SceneSpec(min_side=64, max_side=80, max_objects=2, min_garment=20, max_garment=40))
    code, out, err = run_main(capsys, "segment", "train", "--model", "convnext_atto", "--data", data, "--output",
                              tmp_path / "r", "--no-aux-head", "--head", "fpn", "--channels", 16, "--epochs", 1,
                              "--batch-size", 2, "--input-size", 64, "--workers", 0, "--threads", 1, "--no-progress",
                              "--warmup-epochs", 0)
    assert code == 0, err
    line = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert line["train_loss"] > 0 and "train_loss_aux" not in line and "mIoU" in line


# --- L. data that would build a wrong model: one line naming the file and the id -----------------------

def _coco(tmp_path, images=None, annotations=None, categories=None):
    img = tmp_path / "img"
    img.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(img / "a.jpg")
    data = {"images": images if images is not None else [{"id": 7, "file_name": "a.jpg", "height": 60, "width": 80}],
            "annotations": annotations if annotations is not None else
            [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 30], "iscrowd": 0}],
            "categories": categories if categories is not None else [{"id": 3, "name": "shirt"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img


@pytest.mark.parametrize("change,needle", [
    ({"images": [{"id": 7, "file_name": "a.jpg", "height": 60, "width": 80},
                 {"id": 7, "file_name": "a.jpg", "height": 60, "width": 80}]}, "image id 7 appears twice"),
    ({"categories": [{"id": 3, "name": "shirt"}, {"id": 3, "name": "coat"}]}, "category id 3 appears twice"),
    ({"annotations": [{"id": 4, "image_id": 7, "category_id": 3, "bbox": [10, 5, float("nan"), 30]}]},
     "annotation 4 (image 7) has a non-finite bbox"),
    ({"images": [{"id": 7, "file_name": "a.jpg", "height": "60", "width": "80"}]}, "image 7 has no valid 'width'"),
    ({"images": [{"id": 7, "height": 60, "width": 80}]}, "image 7 has no valid 'file_name'"),
    ({"categories": [{"name": "shirt"}]}, "categories[0] has no integer 'id'"),
])
def test_coco_files_that_would_build_a_wrong_model_are_one_clear_error(tmp_path, change, needle):
    from convnext.data.coco import CocoDetection

    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        CocoDetection(*_coco(tmp_path, **change))


def test_a_sixteen_bit_mask_label_above_255_names_its_file(tmp_path):
    from convnext.data.segdata import SegmentationFolder

    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "images" / split / "x.jpg")
        Image.fromarray(np.full((4, 6), 300, np.uint16)).save(tmp_path / "annotations" / split / "x.png")
    ds = SegmentationFolder(tmp_path, "train")
    with pytest.raises(DataError, match=r"x.png: label 300 \(class indices are 0..254, 255 = ignore\)"):
        ds.max_label()
    assert ds[0][0] is None and "label 300" in ds.unreadable_reason(0)  # in training: a bad sample, named


def test_degenerate_polygons_and_garbage_rle_are_skipped_and_said(tmp_path, caplog):
    from convnext.data.coco import CocoDetection

    good = {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 5, 20, 30]}
    anns = [good, {**good, "id": 2, "segmentation": [[10, 10]]},  # one point
            {**good, "id": 3, "segmentation": {"size": [60, 80], "counts": "0"}},  # not an RLE of 60x80
            {**good, "id": 4, "segmentation": {"size": [60, 80], "counts": "garbage!!"}}]
    with caplog.at_level("WARNING"):
        ds = CocoDetection(*_coco(tmp_path, annotations=anns))
    assert "skipped 3 annotation(s)" in caplog.text and "fewer than 3 points" in caplog.text
    assert "unreadable RLE" in caplog.text
    _, target, _ = ds[0]  # and no crash mid-epoch
    assert len(target["boxes"]) == 1


# --- M. bad input: one line, never a traceback ---------------------------------------------------------

def test_yaml_errors_are_one_line(tmp_path, capsys):
    bad = {"evil.yaml": 'model: !!python/object/apply:os.system ["touch pwned"]\n', "syntax.yaml": "model: [a\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        code, _, err = run_main(capsys, "train", "--config", tmp_path / name, "--data", tmp_path)
        assert code == 2 and "not a readable recipe" in one_line(err)
    assert not Path("pwned").exists()


def test_damaged_checkpoint_headers_are_one_line(tiny, tmp_path, capsys):
    from convnext.weights import write_model_file

    sd = convnext.create_model("convnext_atto", num_classes=2).state_dict()
    cases = {"classes.safetensors": {"model_name": "convnext_atto", "classes": {"a": 1}},
             "pre.safetensors": {"model_name": "convnext_atto", "classes": ["a", "b"], "preprocess": {"std": [0, 1, 1]}}}
    for name, spec in cases.items():
        write_model_file(tmp_path / name, "classify", spec, sd)
        code, _, err = run_main(capsys, "eval", "--checkpoint", tmp_path / name, "--data", tiny)
        assert code == 2 and "damaged" in one_line(err), err
    torch.save({1: torch.zeros(3)}, tmp_path / "intkeys.pt")
    torch.save({"model": sd, "step": 3, "model_name": "convnext_atto", "config": "lr=1"}, tmp_path / "cfgstr.pt")
    for name, needle in (("intkeys.pt", "a key 1 of type int"), ("cfgstr.pt", "whose config is damaged")):
        code, _, err = run_main(capsys, "eval", "--checkpoint", tmp_path / name, "--data", tiny)
        assert code == 2 and needle in one_line(err) and name in err, err


@pytest.mark.parametrize("args,needle", [
    (("detect", "train", "--data", "DATA", "--output", "OUT", "--fpn-channels", "0"), "--fpn-channels must be >= 1"),
    (("segment", "train", "--data", "DATA", "--output", "OUT", "--channels", "0"), "--channels must be >= 1"),
    (("train", "--data", "DATA", "--output", "OUT", "--batch-size", "4", "--finetune", "convnext_tiny.fb_in1k"),
     "CACHE"),
    (("export", "--checkpoint", "CKPT", "--format", "onnx", "--input-size", "-5"), "--input-size must be >= 32"),
    (("export", "--checkpoint", "CKPT", "--format", "torchscript", "--static-size", "--input-size", "16"),
     "--input-size must be >= 32"),
    (("eval", "--checkpoint", "CKPT", "--data", "DATA", "--output", "AFILE"), "is a file"),
    (("detect", "predict", "IMG", "--checkpoint", "CKPT", "--output", "AFILE"), "is a file"),
    (("frobnicate",), "invalid choice"),  # argparse's own errors are one line too
    (("train", "--epochs"), "expected one argument"),
])
def test_bad_input_is_one_line_exit_2(tiny, tmp_path, capsys, args, needle):
    ckpt = tmp_path / "m.safetensors"
    convnext.save_checkpoint(convnext.create_model("convnext_atto", num_classes=2), ckpt, classes=["cat", "dog"])
    (tmp_path / "afile").write_text("x")
    image = next((tiny / "val").rglob("*.png"))
    subst = {"CKPT": ckpt, "DATA": tiny, "AFILE": tmp_path / "afile", "IMG": image, "OUT": tmp_path / "out"}
    if needle == "CACHE":  # the download cache is a file
        (tmp_path / "cache").write_text("x")
        needle = "is a file; point CONVNEXT_CACHE at a folder"
    try:
        code, _, err = run_main(capsys, *[subst.get(a, a) for a in args])
    except SystemExit as e:  # argparse exits itself
        code, err = e.code, capsys.readouterr().err
    assert code == 2 and needle in one_line(err), err


def test_a_full_or_read_only_disk_is_one_line_exit_1(tiny, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.safetensors"
    convnext.save_checkpoint(convnext.create_model("convnext_atto", num_classes=2), ckpt, classes=["cat", "dog"])

    def full(*args, **kwargs):  # what torch's writers raise when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed / unexpected pos 1024 vs 5")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", full)
        m.setattr(torch.jit, "save", full)
        code, _, err = run_main(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript", "--output",
                                tmp_path / "a.pt")
        assert code == 1 and "no space left on device writing" in one_line(err) and "a.pt" in err
        code, _, err = run_main(capsys, *train_args(tiny, tmp_path / "r"))
        assert code == 1 and "no space left on device writing" in one_line(err) and "step-" in err
    assert not list(tmp_path.glob(".a.pt.*")) and not list((tmp_path / "r").rglob(".*.tmp"))  # nothing half-written

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    with monkeypatch.context() as m:
        m.setattr("convnext.utils.os.replace", read_only)
        code, _, err = run_main(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript", "--output",
                                tmp_path / "b.pt")
    assert code == 1 and "read-only file system writing" in one_line(err)


# --- N. SIGTERM: nothing half-written stays -------------------------------------------------------------

def test_sigterm_mid_write_removes_the_temporary_file(tmp_path):
    """A SIGTERM while a file is being written (the CLI turns it into an exit that unwinds) leaves no
    temporary file; in a real process, killed while writing a large checkpoint."""
    code = (
        "import os, signal, sys, torch\n"
        "from convnext.cli import _on_sigterm\n"
        "from convnext.utils import atomic_write\n"
        "signal.signal(signal.SIGTERM, _on_sigterm)\n"
        "def write(tmp):\n"
        "    torch.save({'w': torch.zeros(1 << 20)}, tmp)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        f"atomic_write({str(tmp_path / 'big.pt')!r}, write)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_removes_what_an_interrupted_write_left(tiny, tmp_path, capsys):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    left = [out / ".last.pt.k3j9x2ab.tmp", out / "checkpoints" / ".step-00000004.pt.a8sd7f6g.tmp"]
    mine = out / ".notes.tmp"  # not a temporary file of ours: kept
    for p in (*left, mine):
        p.write_bytes(b"x" * 1000)
    assert run_main(capsys, *train_args(tiny, out))[0] == 0
    assert not any(p.exists() for p in left) and mine.exists()
