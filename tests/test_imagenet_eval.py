"""The papers' evaluation protocols on generated ImageNet-layout sets: restricted logits (ImageNet-A/-R), ReaL
(against timm's RealLabelsImagenet), ImageNet-C's mCE (against the formula), the devkit layout (against
torchvision's parse_meta_mat), published tags with their preprocessing (against timm's and torchvision's
transforms), results files, devices, and a 2-process evaluation equal to one process."""

import csv
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import one_line, run_main
from PIL import Image
from safetensors.torch import save_file

import convnext
from convnext.data import ImageFolder, LabelledFiles, eval_transform
from convnext.data.imagenet import ALEXNET_ERR, synsets, val_filename
from convnext.eval.classify import evaluate_checkpoint
from convnext.factory import load_for_inference
from convnext.preprocess import Preprocess
from convnext.weights import PRETRAINED

IN1K = synsets("imagenet-1k")
BIAS = {700: 100.0, 500: 90.0, 999: 80.0}  # the model's ranking on every image: 700, then 500, then 999


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A 1000-class checkpoint as published (a bare state dict), whose head ranks 700 > 500 > 999 > the rest."""
    torch.manual_seed(0)
    model = convnext.create_model("convnext_atto")
    with torch.no_grad():
        for i, b in BIAS.items():
            model.head.fc.bias[i] = b
    path = tmp_path_factory.mktemp("published") / "convnext_atto_in1k.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _images(folder, names, seed, size=(40, 48)):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name, format="JPEG")
    return [folder / n for n in names]


def _val_set(root, per_class: dict[int, int], start=1):
    """ImageNet-val-style synset folders, files named as the devkit's (numbered from `start`)."""
    i, out = start, []
    for idx, n in per_class.items():
        names = [val_filename(j) for j in range(i, i + n)]
        out += [(p, idx) for p in _images(root / IN1K[idx], names, idx)]
        i += n
    return out


@torch.no_grad()
def _logits(checkpoint, paths):
    model, info = load_for_inference(checkpoint)
    t = info.transform()
    return model(torch.stack([t(Image.open(p).convert("RGB")) for p in paths]))


def _eval(published, data, **kw):
    return evaluate_checkpoint(published, data, optimize=False, progress=False, **kw)


def test_restricted_logits_equal_an_explicit_masking(published, tmp_path):
    samples = _val_set(tmp_path / "a", {500: 3, 999: 2})  # ImageNet-A-like: a subset, the model's best class absent
    plain, folder = _eval(published, tmp_path / "a"), _eval(published, tmp_path / "a", valid_classes="folder")
    logits = _logits(published, sorted(p for p, _ in samples))  # the dataset's order: sorted paths
    targets = torch.tensor([t for _, t in sorted(samples)])
    masked = torch.full_like(logits, float("-inf"))
    masked[:, [500, 999]] = logits[:, [500, 999]]
    top = masked.topk(2, dim=1).indices  # 2 valid classes: top-5 is top-2
    assert plain["acc1"] == 0.0 and folder["acc1"] == pytest.approx(100.0 * (top[:, 0] == targets).float().mean().item())
    assert folder["acc1"] == pytest.approx(60.0) and folder["acc5"] == 100.0 and folder["valid_classes"] == 2
    assert folder["loss"] == pytest.approx(F.cross_entropy(masked, targets).item(), rel=1e-5)
    indices = tmp_path / "imagenet_a_indices.txt"  # timm's --valid-labels file: one index per line
    indices.write_text("999\n500\n3\n")
    by_file = _eval(published, tmp_path / "a", valid_classes=indices)
    masked[:, 3] = logits[:, 3]
    assert by_file["acc1"] == pytest.approx(100.0 * (masked.argmax(1) == targets).float().mean().item())
    assert by_file["valid_classes"] == 3
    (tmp_path / "names.txt").write_text(f"{IN1K[500]}\n")  # a class of the data left out: an error
    with pytest.raises(ValueError, match=f"1 class\\(es\\) of the data are not among them: {IN1K[999]}"):
        _eval(published, tmp_path / "a", valid_classes=tmp_path / "names.txt")


def test_the_imagenet_a_and_r_class_lists_restrict_to_their_200(published, tmp_path):
    a = synsets("imagenet-a")
    idx = [IN1K.index(a[0]), IN1K.index(a[1])]
    _val_set(tmp_path / "a", {idx[0]: 1, idx[1]: 1})
    res = _eval(published, tmp_path / "a", valid_classes="imagenet-a")
    assert res["valid_classes"] == 200 and res["count"] == 2
    with pytest.raises(ValueError, match="of the data are not among them"):  # class 500 is not an ImageNet-R class
        assert IN1K[500] not in synsets("imagenet-r")
        _val_set(tmp_path / "r", {500: 1})
        _eval(published, tmp_path / "r", valid_classes="imagenet-r")


def test_real_accuracy_equals_timms_real_labels(published, tmp_path):
    from timm.data import RealLabelsImagenet

    samples = _val_set(tmp_path / "val", {700: 2, 500: 2, 3: 2})
    real = [[700], [500], [], [999, 3], [1, 2], [700, 500]]  # as published: entry i is ILSVRC2012_val_{i+1}
    (tmp_path / "real.json").write_text(json.dumps(real))
    res = _eval(published, tmp_path / "val", real_labels=tmp_path / "real.json")
    paths = sorted(p for p, _ in samples)
    timm_real = RealLabelsImagenet([str(p) for p in paths], real_json=str(tmp_path / "real.json"))
    timm_real.add_result(_logits(published, paths))
    assert res["real_acc1"] == pytest.approx(timm_real.get_accuracy(1)) == pytest.approx(40.0)
    assert res["real_acc5"] == pytest.approx(timm_real.get_accuracy(5)) == pytest.approx(80.0)
    assert res["real_count"] == 5 and res["count"] == 6 and res["acc1"] == pytest.approx(100 * 2 / 6)
    from convnext.eval.classify import format_results

    assert "  ReaL top-1 40.00%  top-5 80.00%  (5 images with ReaL labels)" in format_results(res).splitlines()
    (tmp_path / "short.json").write_text(json.dumps(real[:4]))
    with pytest.raises(ValueError, match="2 image\\(s\\) of the data have no ReaL entry"):
        _eval(published, tmp_path / "val", real_labels=tmp_path / "short.json")


def _corruption_tree(root, plan):
    """plan: {corruption path: {severity: (images of class 700, images of class 500)}}; the model says 700."""
    for corr, severities in plan.items():
        for sev, (right, wrong) in severities.items():
            for idx, n, seed in ((700, right, 1), (500, wrong, 2)):
                if n:
                    _images(root / corr / sev / IN1K[idx], [f"{seed}_{i}.JPEG" for i in range(n)], seed)


def test_imagenet_c_gives_top1_per_corruption_and_the_alexnet_normalised_mce(published, tmp_path, capsys):
    plan = {"noise/gaussian_noise": {"1": (3, 1), "2": (1, 1)}, "fog": {"1": (1, 3)}, "my_blur": {"3": (2, 0)}}
    _corruption_tree(tmp_path / "c", plan)
    res = _eval(published, tmp_path / "c")
    err = {"gaussian_noise": [1 / 4, 1 / 2], "fog": [3 / 4]}
    ce = {c: np.mean(e) / ALEXNET_ERR[c] for c, e in err.items()}  # Hendrycks & Dietterich: mean error / AlexNet's
    assert res["mce"] == pytest.approx(100 * np.mean(list(ce.values())))
    assert res["mce_corruptions"] == ["fog", "gaussian_noise"]  # my_blur has no AlexNet error: not in the mCE
    per = res["per_corruption"]
    assert per["gaussian_noise"]["top1"] == {"1": 75.0, "2": 50.0} and per["fog"]["top1"] == {"1": 25.0}
    assert per["gaussian_noise"]["ce"] == pytest.approx(100 * ce["gaussian_noise"]) and per["my_blur"]["ce"] is None
    assert res["count"] == 4 + 2 + 4 + 2 and res["acc1"] == pytest.approx(100 * 7 / 12)
    code, out, err_text = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "c", "--json",
                                   "--no-optimize")
    assert code == 0, err_text
    assert json.loads(out)["mce"] == pytest.approx(res["mce"]) and "per_corruption" in json.loads(out)
    code, out, _ = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "c", "--no-optimize")
    assert code == 0 and f"mCE {res['mce']:.2f}% (AlexNet-normalised, over 2 corruptions)" in out
    assert "gaussian_noise     top-1 by severity  1: 75.00  2: 50.00  mean 62.50%  CE " in out


def test_class_folders_with_numbered_sub_folders_are_not_imagenet_c(published, tmp_path):
    for idx, n in ((700, 2), (500, 1)):
        _images(tmp_path / "val" / IN1K[idx] / "1" / "x", [f"{i}.JPEG" for i in range(n)], idx)
    res = _eval(published, tmp_path / "val")
    assert res.get("per_corruption") is None and res["count"] == 3 and res["acc1"] == pytest.approx(200 / 3)


def _meta_mat(path, order):
    """A devkit meta.mat: the 1000 leaves with ILSVRC2012_IDs in `order` (not the sorted order) and two inner nodes."""
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(i + 1, IN1K[j], f"class {j}", "", 0, 0, 1300) for i, j in enumerate(order)]
    rows += [(1001, "n00001740", "entity", "", 2, 18, 0), (1002, "n00002137", "abstraction", "", 3, 17, 0)]
    arr = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(rows):
        arr[i, 0] = tuple(np.array(v) if isinstance(v, int) else v for v in r)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"synsets": arr})


def parse_meta_mat(devkit_root):
    """torchvision 0.29 `datasets/imagenet.py`, `parse_devkit_archive.parse_meta_mat` (a nested function there,
    behind an md5 check of the real archive), transcribed."""
    import scipy.io as sio

    metafile = os.path.join(devkit_root, "data", "meta.mat")
    meta = sio.loadmat(metafile, squeeze_me=True)["synsets"]
    nums_children = list(zip(*meta, strict=True))[4]
    meta = [meta[idx] for idx, num_children in enumerate(nums_children) if num_children == 0]
    idcs, wnids, classes = list(zip(*meta, strict=True))[:3]
    classes = [tuple(clss.split(", ")) for clss in classes]
    idx_to_wnid = {idx: wnid for idx, wnid in zip(idcs, wnids, strict=True)}
    wnid_to_classes = {wnid: clss for wnid, clss in zip(wnids, classes, strict=True)}
    return idx_to_wnid, wnid_to_classes


def test_the_devkit_layout_gives_the_same_top1_as_synset_folders(published, tmp_path):
    order = np.random.default_rng(0).permutation(1000).tolist()  # ILSVRC2012_ID i+1 -> sorted class order[i]
    devkit = tmp_path / "ILSVRC2012_devkit_t12"
    _meta_mat(devkit / "data" / "meta.mat", order)
    idx_to_wnid, _ = parse_meta_mat(str(devkit))  # torchvision's reader: the same mapping
    assert idx_to_wnid == {i + 1: IN1K[j] for i, j in enumerate(order)}
    samples = _val_set(tmp_path / "folders", {700: 3, 500: 2, 999: 1})
    flat = tmp_path / "flat"
    flat.mkdir()
    truth = []
    for p, idx in sorted(samples, key=lambda s: s[0].name):
        os.link(p, flat / p.name)
        truth.append(str(order.index(idx) + 1))
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(devkit, arcname="ILSVRC2012_devkit_t12")
    (tmp_path / "synsets.txt").write_text("\n".join(IN1K[order[int(t) - 1]] for t in truth) + "\n")
    want = _eval(published, tmp_path / "folders")
    assert want["acc1"] == 50.0
    for labels in (devkit, tmp_path / "ILSVRC2012_devkit_t12.tar.gz", devkit / "data" /
                   "ILSVRC2012_validation_ground_truth.txt", tmp_path / "synsets.txt"):
        got = _eval(published, flat, labels=labels)
        assert (got["acc1"], got["acc5"], got["count"]) == (want["acc1"], want["acc5"], want["count"]), labels
        assert got["per_class_count"] == want["per_class_count"]
    (flat / val_filename(2)).unlink()  # a devkit lists every image: the ones not here are counted, not an error
    assert _eval(published, flat, labels=devkit)["count"] == 5
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n1001\n")
    with pytest.raises(ValueError, match=":2: '1001' is not an ILSVRC2012_ID"):
        _eval(published, flat, labels=devkit)


def test_kaggles_loc_val_solution_csv_is_read(published, tmp_path):
    samples = _val_set(tmp_path / "folders", {700: 1, 500: 1})
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = ["ImageId,PredictionString"]
    for p, idx in samples:
        os.link(p, flat / p.name)
        rows.append(f"{p.stem},{IN1K[idx]} 1 2 30 40 {IN1K[idx]} 5 6 7 8")
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    res = _eval(published, flat, labels=tmp_path / "LOC_val_solution.csv")
    assert res["count"] == 2 and res["acc1"] == 50.0


def _timm_tags():
    import timm

    known = set(timm.list_pretrained("convnext*"))
    return [t for t in PRETRAINED if t in known and PRETRAINED[t].num_classes]


def _photos():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 257), (257, 411))]


def test_the_published_preprocessing_equals_timms_transform():
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    tags = _timm_tags()
    assert len(tags) >= 40
    seen = set()
    for tag in tags:
        cfg = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(tag).to_dict())
        ours = PRETRAINED[tag].preprocess
        key = (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"], cfg["interpolation"])
        assert (ours.input_size, ours.crop_pct, ours.crop_mode, ours.interpolation) == key[0][1:2] + key[1:], tag
        if key in seen:
            continue
        seen.add(key)
        theirs = create_transform(**cfg)
        for img in _photos():
            torch.testing.assert_close(eval_transform(ours)(img), theirs(img), atol=1e-6, rtol=0)
    assert len(seen) >= 3  # 224 center 0.875, 224 center 0.95, 384/512 squash


def test_torchvision_tags_take_torchvisions_own_transform():
    import torchvision

    for size in ("tiny", "small", "base", "large"):
        pre = PRETRAINED[f"convnext_{size}.tv_in1k"].preprocess
        theirs = getattr(torchvision.models, f"ConvNeXt_{size.capitalize()}_Weights").IMAGENET1K_V1.transforms()
        for img in _photos():
            torch.testing.assert_close(eval_transform(pre)(img), theirs(img), atol=1e-6, rtol=0)


def test_overrides_for_test_time_resolution_keep_timms_semantics():
    from timm.data import create_transform

    base = PRETRAINED["convnext_tiny.fb_in22k_ft_in1k_384"].preprocess
    for pre, cfg in ((Preprocess(288, 1.0), dict(input_size=288, crop_pct=1.0, crop_mode="center")),
                     (Preprocess(448, 0.9, crop_mode="center"), dict(input_size=448, crop_pct=0.9, crop_mode="center")),
                     (Preprocess(320, 0.95, crop_mode="squash"), dict(input_size=320, crop_pct=0.95, crop_mode="squash")),
                     (base, dict(input_size=384, crop_pct=1.0, crop_mode="squash"))):
        theirs = create_transform(**cfg, interpolation="bicubic")
        for img in _photos():
            torch.testing.assert_close(eval_transform(pre)(img), theirs(img), atol=1e-6, rtol=0)
    assert Preprocess.from_dict({"input_size": 384, "crop_pct": 0.875}).crop_mode == "squash"  # files before crop_mode


@pytest.fixture
def cache(tmp_path, monkeypatch, published):
    """The download cache holding convnextv2_atto.fcmae_ft_in1k's file (offline: placed, not downloaded)."""
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    model = convnext.create_model("convnextv2_atto")
    (tmp_path / "cache").mkdir()
    torch.save({"model": model.state_dict()}, tmp_path / "cache" / PRETRAINED["convnextv2_atto.fcmae_ft_in1k"].filename)
    return model


def test_a_published_tag_is_evaluated_with_its_preprocessing_and_overrides(cache, tmp_path, capsys):
    _val_set(tmp_path / "val", {700: 2, 3: 1})
    code, out, err = run_main(capsys, "eval", "--model", "convnextv2_atto", "--pretrained", "fcmae_ft_in1k",
                              "--data", tmp_path / "val", "--json", "--no-optimize", "--results-file",
                              tmp_path / "r.csv")
    assert code == 0, err
    res = json.loads(out)
    assert res["weights"] == "convnextv2_atto.fcmae_ft_in1k" and res["count"] == 3
    assert res["preprocess"] | {} == Preprocess().to_dict()  # 224, crop 0.875, bicubic, center
    code, out, err = run_main(capsys, "eval", "--model", "convnextv2_atto", "--pretrained", "convnextv2_atto.fcmae_ft_in1k",
                              "--data", tmp_path / "val", "--json", "--input-size", 64, "--crop-pct", 1.0,
                              "--interpolation", "bilinear", "--results-file", tmp_path / "r.csv")
    assert code == 0, err
    pre = json.loads(out)["preprocess"]
    assert (pre["input_size"], pre["crop_pct"], pre["interpolation"], pre["crop_mode"]) == (64, 1.0, "bilinear", "center")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["input_size"] for r in rows] == ["224", "64"] and rows[0]["model"] == "convnextv2_atto"
    assert rows[0]["weights"] == "convnextv2_atto.fcmae_ft_in1k" and rows[0]["count"] == "3"
    assert float(rows[0]["img_s"]) > 0 and rows[0]["device"] == "cpu" and rows[0]["real_top1"] == ""
    assert float(rows[1]["top1"]) == pytest.approx(json.loads(out)["acc1"], abs=1e-3)
    code, out, err = run_main(capsys, "eval", "--pretrained", "convnextv2_atto.fcmae_ft_in1k", "--data",
                              tmp_path / "val", "--json")  # a full tag names its model
    assert code == 0 and json.loads(out)["model_name"] == "convnextv2_atto", err
    for args, needle in ((("--pretrained", "nope"), "neither a weights tag nor an existing file"),
                         (("--pretrained", "fcmae"), "not a published classifier"),
                         ((), "nothing to evaluate: give --checkpoint FILE, or --model NAME")):
        code, _, err = run_main(capsys, "eval", *((("--model", "convnextv2_atto") + args) if args else ()),
                                "--data", tmp_path / "val")
        assert code == 2 and needle in one_line(err), err


def test_results_files_append_rows_and_refuse_what_is_not_theirs(published, tmp_path):
    _val_set(tmp_path / "val", {700: 1})
    for name in ("r.json", "r.jsonl", "r.csv"):
        for _ in range(2):
            _eval(published, tmp_path / "val", results_file=tmp_path / name)
    assert len(json.loads((tmp_path / "r.json").read_text())) == 2
    assert [json.loads(x)["top1"] for x in (tmp_path / "r.jsonl").read_text().splitlines()] == [100.0, 100.0]
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 3
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="its header is not a convnext results file"):
        _eval(published, tmp_path / "val", results_file=tmp_path / "other.csv")
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"
    for bad, needle in ((tmp_path / "r.txt", "must end in .csv, .json or .jsonl"),
                        (tmp_path / "val" / "r.csv", "is inside --data")):
        with pytest.raises(ValueError, match=needle):
            _eval(published, tmp_path / "val", results_file=bad)


def test_devices_and_precisions(published, tmp_path, capsys):
    _val_set(tmp_path / "val", {700: 2, 500: 1})
    fp32 = _eval(published, tmp_path / "val", device="cpu")
    fp16 = _eval(published, tmp_path / "val", device="cpu", precision="fp16")
    bf16 = evaluate_checkpoint(published, tmp_path / "val", precision="bf16", progress=False)  # a bf16 model
    assert fp32["acc1"] == fp16["acc1"] == bf16["acc1"] and fp16["how"] == "eager, autocast fp16"
    assert fp32["device"] == "cpu" and fp32["img_s"] > 0
    for device, needle in (("cuda", "torch sees no CUDA device"), ("cuda:x", "auto, cpu, cuda or cuda:N"),
                           ("tpu", "auto, cpu, cuda or cuda:N")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        code, _, err = run_main(capsys, "eval", "--checkpoint", published, "--data", tmp_path / "val",
                                "--device", device)
        assert code == 2 and needle in one_line(err), err


@pytest.mark.slow
def test_two_processes_count_every_image_once_and_equal_one_process(published, tmp_path):
    samples = _val_set(tmp_path / "val", {700: 3, 500: 2, 999: 1, 3: 1})  # 7 images: shares of 4 and 3
    real = [[700], [700, 3], [], [500], [999], [1], [3]]
    (tmp_path / "real.json").write_text(json.dumps(real))
    args = ["eval", "--checkpoint", published, "--data", tmp_path / "val", "--json", "--real-labels",
            tmp_path / "real.json", "--no-optimize", "--batch-size", 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, "-m", "convnext", *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=600)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          "-m", "convnext", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # one report: rank 0's
    assert b["processes"] == 2 and a["processes"] == 1 and len(samples) == a["count"] == b["count"] == 7
    for k in ("acc1", "acc5", "real_acc1", "real_acc5", "real_count", "per_class_acc", "confused"):
        assert a[k] == b[k], k
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_a_labelled_folder_keeps_indices_when_trained_classes_differ(tmp_path):
    (p,) = _images(tmp_path / "flat", ["x.JPEG"], 0)
    (tmp_path / "l.csv").write_text("filename,label\nx.JPEG,b\n")
    ds = LabelledFiles(tmp_path / "flat", tmp_path / "l.csv", classes=["a", "b", "c"])
    assert ds.samples == [(str(p), 1)] and isinstance(ds, ImageFolder)


def test_the_uint8_batch_path_is_bitwise_the_per_image_transform():
    from convnext.data.transforms import normalize_batch

    pre = PRETRAINED["convnext_tiny.tv_in1k"].preprocess
    imgs = _photos()
    want = torch.stack([eval_transform(pre)(im) for im in imgs])
    raw = torch.stack([eval_transform(pre, normalize=False)(im) for im in imgs])
    assert raw.dtype == torch.uint8
    got = normalize_batch(raw, torch.tensor(pre.mean).view(-1, 1, 1), torch.tensor(pre.std).view(-1, 1, 1))
    assert torch.equal(got, want)


def test_published_weights_read_pixels_as_stored_and_ours_apply_exif(published, tmp_path):
    from convnext.eval.classify import _load
    from convnext.weights.loading import save_checkpoint

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    (tmp_path / "c" / "x").mkdir(parents=True)
    im.save(tmp_path / "c" / "x" / "a.jpg", exif=exif.tobytes())
    stored = ImageFolder(tmp_path / "c", seed=None, exif=False)[0][0]
    shown = ImageFolder(tmp_path / "c")[0][0]
    timm_loader = Image.open(tmp_path / "c" / "x" / "a.jpg").convert("RGB")  # timm / torchvision's pil_loader
    assert stored.size == timm_loader.size == (50, 30) and shown.size == (30, 50)
    assert np.array_equal(np.asarray(stored), np.asarray(timm_loader))
    model, _ = load_for_inference(published)
    save_checkpoint(model, tmp_path / "ours.safetensors", classes=list(IN1K))
    assert _load(published, None, None, None)[3] is True  # a bare published file: the published protocol
    assert _load(tmp_path / "ours.safetensors", None, None, None)[3] is False  # trained here: as in training
