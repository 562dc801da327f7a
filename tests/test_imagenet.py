"""ImageNet as researchers hold it: the class lists as data, names in predict, and every common layout of the
validation data mapping each image to its index among the model's 1000 classes (never renumbered)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_main
from PIL import Image
from safetensors.torch import save_file

import convnext
from convnext.data.imagenet import default_classes, display_name, synsets
from convnext.eval.metrics import evaluate
from convnext.factory import load_for_inference

IN1K = synsets("imagenet-1k")
PICK = {500: 3, 700: 2, 999: 1}  # class index -> images of it; the model predicts class 700 for every image


def test_the_class_lists_are_the_published_orders():
    assert len(IN1K) == 1000 and list(IN1K) == sorted(IN1K) and IN1K[0] == "n01440764" and IN1K[-1] == "n15075141"
    assert display_name("n01440764") == "tench" and display_name("n15075141") == "toilet tissue"
    in22k = synsets("imagenet-22k")
    assert len(in22k) == 21841 and list(in22k) == sorted(in22k) and len(set(in22k)) == 21841
    assert len(synsets("imagenet-a")) == len(synsets("imagenet-r")) == 200 and set(synsets("imagenet-a")) < set(IN1K)
    assert default_classes(21841) == list(in22k) and default_classes(10) == [str(i) for i in range(10)]
    assert display_name("cat") == "cat"  # a class that is no synset is shown as it is


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A 1000-class checkpoint as published (a bare state dict, no class names), whose head says class 700."""
    torch.manual_seed(0)
    model = convnext.create_model("convnext_atto")
    with torch.no_grad():
        model.head.fc.bias[700] = 100.0
    path = tmp_path_factory.mktemp("published") / "convnext_atto_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _images(folder, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"ILSVRC2012_val_{seed:04d}{i:04d}.JPEG"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(p, format="JPEG")
        out.append(p)
    return out


def test_a_published_checkpoint_gets_the_imagenet_classes_and_predict_prints_names(published, tmp_path, capsys):
    model, info = load_for_inference(published)
    assert info.classes == list(IN1K)
    (img,) = _images(tmp_path / "x", 1, 1)
    code, out, err = run_main(capsys, "predict", img, "--checkpoint", published, "--topk", 2, "--json")
    assert code == 0, err
    top = json.loads(out)[0]["top"][0]
    assert top == {"index": 700, "class": IN1K[700], "name": display_name(IN1K[700]), "probability": top["probability"]}
    assert top["probability"] > 0.99 and display_name(IN1K[700]) == "paper towel"
    code, out, _ = run_main(capsys, "predict", img, "--checkpoint", published, "--topk", 1)
    assert code == 0 and out.strip().endswith(": paper towel 100.0%")


def _expected_acc1():
    return 100.0 * PICK[700] / sum(PICK.values())


@pytest.mark.parametrize("layout", ["synset-subset", "index-folders", "csv", "jsonl"])
def test_every_layout_maps_images_to_the_models_indices(published, tmp_path, capsys, layout):
    data, extra = tmp_path / "val", []
    rows = []
    for idx, n in PICK.items():
        folder = {"synset-subset": data / IN1K[idx], "index-folders": data / str(idx)}.get(layout, data)
        for p in _images(folder, n, idx):
            label = [IN1K[idx], display_name(IN1K[idx]), str(idx)][len(rows) % 3]  # synset, name or index
            rows.append((p.name, label))
    if layout == "csv":
        (tmp_path / "labels.csv").write_text("filename,label\n" + "".join(f"{f},{lab}\n" for f, lab in rows))
        extra = ["--labels", tmp_path / "labels.csv"]
    elif layout == "jsonl":
        (tmp_path / "labels.jsonl").write_text("".join(json.dumps({"path": f, "label": lab}) + "\n" for f, lab in rows))
        extra = ["--labels", tmp_path / "labels.jsonl"]
    code, out, err = run_main(capsys, "eval", "--checkpoint", published, "--data", data, "--output", tmp_path / "o",
                              "--json", "--no-optimize", *extra)
    assert code == 0, err
    res = json.loads(out)
    # renumbering the three classes 0, 1, 2 would give 0 %: the model's answer is index 700
    assert res["count"] == 6 and res["acc1"] == pytest.approx(_expected_acc1())
    assert "confusion" not in res and not (tmp_path / "o" / "confusion_matrix.png").exists()  # 1000 classes
    assert res["confused"] == [[IN1K[500], IN1K[700], 3], [IN1K[999], IN1K[700], 1]]


def test_the_text_report_of_a_1000_class_eval_lists_the_classes_seen_and_the_most_confused(published, tmp_path,
                                                                                           capsys):
    for idx, n in PICK.items():
        _images(tmp_path / "val" / IN1K[idx], n, idx)
    code, out, err = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "val", "--no-optimize",
                              "--output", tmp_path / "o")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1 + 3 + 1 + 1 and f"{IN1K[700]} paper towel" in out
    assert lines[-2].startswith("most confused (truth -> predicted, images): ")
    assert f"{display_name(IN1K[500])} -> paper towel 3" in lines[-2]
    assert " img/s on cpu x1 (fp32" in lines[-1] and "224px, crop_pct 0.875 (center), bicubic" in lines[-1]
    saved = (tmp_path / "o" / "most_confused.csv").read_text().splitlines()  # saved too, as the issue asks
    assert saved[0] == "truth,truth_name,predicted,predicted_name,images"
    assert saved[1] == f"{IN1K[500]},{display_name(IN1K[500])},{IN1K[700]},paper towel,3"
    code, _, err = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "val", "--no-optimize",
                            "--output", tmp_path / "o")
    assert code == 2 and "most_confused.csv exists; pass --force" in err  # never overwritten without --force


@pytest.mark.parametrize("labels, needle", [
    ("filename,label\nnope.JPEG,n01440764\n", "nope.JPEG is listed but missing"),
    ("filename,label\n{f},n99999999\n", "label 'n99999999' is not one of the 1000 classes"),
    ("filename,label\n{f},1000\n", "label '1000' is not one of the 1000 classes"),
    ("filename,label\n{f},0\n{f},1\n", "is listed twice"),
    ("name,label\n{f},0\n", "each row needs `filename` (or `path`) and `label`"),
])
def test_a_labels_file_that_does_not_fit_is_one_line(published, tmp_path, capsys, labels, needle):
    (img,) = _images(tmp_path / "flat", 1, 3)
    (tmp_path / "l.csv").write_text(labels.format(f=img.name))
    code, _, err = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "flat",
                            "--labels", tmp_path / "l.csv", "--output", tmp_path / "o")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_index_folders_are_only_taken_for_a_model_whose_classes_have_other_names(tmp_path):
    from convnext.data import ImageFolder

    for c in ("0", "1"):
        _images(tmp_path / c, 1, int(c))
    def targets(classes):
        return {Path(p).parent.name: t for p, t in ImageFolder(tmp_path, classes=classes).samples}

    assert targets(["a", "b", "c"]) == {"0": 0, "1": 1}  # indices
    assert targets(["1", "0"]) == {"0": 1, "1": 0}  # names win


class _Replay(torch.nn.Module):
    """Returns the given logits, batch after batch."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, x):
        return next(self.outputs)


def test_beyond_the_dense_confusion_limit_counts_and_pairs_are_the_same(monkeypatch):
    """21,841 classes would need a 3.8 GB confusion matrix: above DENSE_CONFUSION_MAX classes the per-class
    counts and the most confused pairs come from sparse counts, equal to the dense path's."""
    import convnext.eval.metrics as metrics
    from convnext.data import Batch

    torch.manual_seed(0)
    logits, targets = torch.randn(12, 10), torch.randint(0, 10, (12,))
    batches = [Batch(torch.zeros(6, 3, 4, 4), targets[i:i + 6], list(range(6)), []) for i in (0, 6)]

    dense = evaluate(_Replay([logits[:6], logits[6:]]), batches, torch.device("cpu"), 10)
    monkeypatch.setattr(metrics, "DENSE_CONFUSION_MAX", 5)
    sparse = evaluate(_Replay([logits[:6], logits[6:]]), batches, torch.device("cpu"), 10)
    assert sparse["confusion"] is None and dense["confusion"] is not None
    for k in ("acc1", "acc5", "count", "per_class_acc", "per_class_count", "loss"):
        assert sparse[k] == dense[k], k
    assert sorted(sparse["confused"], key=lambda t: (-t[2], t)) == sorted(dense["confused"], key=lambda t: (-t[2], t))
    assert sum(k for _, _, k in dense["confused"]) == 12 - int((logits.argmax(1) == targets).sum())


def test_training_reads_a_flat_folder_with_labels_files(tmp_path, capsys):
    data, rows = tmp_path / "flat", {"train": [], "val": []}
    for split, n in (("train", 8), ("val", 4)):
        for c, color in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            for i in range(n):
                p = data / f"{split}_{c}_{i}.png"
                p.parent.mkdir(exist_ok=True)
                Image.new("RGB", (24, 24), color).save(p)
                rows[split].append((p.name, c))
    for split in rows:
        (tmp_path / f"{split}.csv").write_text("path,label\n" + "".join(f"{f},{c}\n" for f, c in rows[split]))
    args = ["train", "--model", "convnext_atto", "--data", data, "--labels", tmp_path / "train.csv", "--val-labels",
            tmp_path / "val.csv", "--output", tmp_path / "run", "--epochs", 1, "--batch-size", 4, "--input-size", 32,
            "--aa", "none", "--mixup", 0, "--cutmix", 0, "--reprob", 0, "--workers", 0, "--no-progress"]
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    _, info = load_for_inference(tmp_path / "run" / "best.safetensors")
    assert info.classes == ["cat", "dog"]
    code, out, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "run" / "best.safetensors", "--data", data,
                              "--labels", tmp_path / "val.csv", "--json", "--output", tmp_path / "o")
    assert code == 0 and json.loads(out)["count"] == 8, err
    code, _, err = run_main(capsys, *args[:7], "--output", tmp_path / "run2")  # --labels without --val-labels
    assert code == 2 and "--labels and --val-labels go together" in err
    (f, c), *rest = rows["train"]  # the same files relabelled: another run's data, refused on resume
    (tmp_path / "train.csv").write_text("path,label\n" + "".join(f"{a},{b}\n" for a, b in
                                                                [(f, "dog" if c == "cat" else "cat"), *rest]))
    more = [a if a != 1 else 2 for a in args]  # --epochs 2
    code, _, err = run_main(capsys, *more, "--resume", "auto")
    assert code == 2 and "checkpoint of another run: the data (data_sha256" in err, err
