"""`convnext bench`: every candidate measured, same weights for all, honest ratios, JSON and errors."""

import json
import subprocess
import sys

import pytest

from convnext import bench


def test_bench_infer_against_timm_and_onnxruntime():
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    res = bench.run(bench.BenchOptions("convnext_atto", batch_size=2, input_size=64, mode="infer",
                                       compare=("timm", "torchvision", "onnxruntime"), repeats=3, warmup=1,
                                       device="cpu", threads=1, memory=False, progress=False))
    names = [r["candidate"] for r in res["results"]]
    assert names == ["convnext (nchw)", "convnext+fused (nchw)", "timm (nchw)", "timm (channels_last)",
                     "onnxruntime+onnx (nchw)"]
    assert res["skipped"] == {"torchvision": "has no convnext_atto"}
    for r in res["results"]:
        assert len(r["times_ms"]) == 3 and r["ms_per_batch"] > 0
        assert r["gflops_per_s"] == pytest.approx(res["gflop_per_batch"] / r["ms_per_batch"] * 1e3)
        assert 0 < r["fraction_of_peak"]
        assert r["peak_mib"] is None  # memory=False
        assert r["max_abs_diff_vs_ours"] <= 1e-4  # the same weights and input went into every candidate
    # 2 * MACs of convnext_atto at 64px, batch 2 (flop_counter)
    assert res["gflop_per_batch"] == pytest.approx(2 * 2 * 0.5513e9 * (64 / 224) ** 2 / 1e9, rel=0.05)
    assert res["matmul_peak_gflops"] > 0
    timm_best = min(r["ms_per_batch"] for r in res["results"] if r["library"] == "timm")
    ours = res["results"][0]["ms_per_batch"]
    assert res["ratios"]["timm"]["eager"] == pytest.approx(timm_best / ours)
    assert "fused" in res["ratios"]["onnxruntime"]
    assert "speed ours/timm (vs its fastest: timm" in bench.format_table(res)


def test_bench_train_cli_json(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "convnext", "bench", "--model", "convnextv2_atto", "--mode", "train",
                        "--batch-size", "2", "--input-size", "32", "--repeats", "2", "--warmup", "1",
                        "--threads", "1", "--compare", "timm", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "speed ours/timm" in r.stdout
    res = json.loads(out.read_text())
    assert res["config"]["mode"] == "train" and res["command"].startswith("convnext bench --model convnextv2_atto")
    assert [x["candidate"] for x in res["results"]] == ["convnext (nchw)", "timm (nchw)", "timm (channels_last)"]
    assert res["machine"]["torch"] and res["machine"]["cores"] >= 1
    # peak memory of each candidate alone in a fresh process: AdamW state + activations > 0
    assert all(x["peak_mib"] > 0 for x in res["results"])
    assert res["ratios"]["timm"]["memory_ours_over_peer"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--model", "resnet50"], "resnet50"),
    (["--compare", "tensorflow"], "unknown peer"),
    (["--batch-size", "0"], "--batch-size"),
    (["--mode", "serve"], "invalid choice"),
])
def test_bench_bad_input_is_one_line(args, needle, capsys):
    from convnext.cli import main

    try:
        code = main(["bench", *args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
