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
                                       compare=("timm", "torchvision", "onnxruntime", "openvino"), repeats=3,
                                       warmup=1, device="cpu", threads=1, memory=False, progress=False,
                                       optimize="eager"))
    names = [r["candidate"] for r in res["results"]]
    assert names == ["convnext (nchw)", "convnext+optimized-eager (nchw)", "timm (nchw)", "timm (channels_last)",
                     "onnxruntime+onnx (nchw)", "openvino+ir (nchw)"]
    assert res["results"][1]["detail"].startswith("eager fast path (fp32)")
    assert res["skipped"] == {"torchvision": "has no convnext_atto"}
    for r in res["results"]:
        assert len(r["times_ms"]) == 3  # every candidate timed in every round
        assert r["peak_mib"] is None  # memory=False
        assert r["max_abs_diff_vs_ours"] <= 1e-4  # the same weights and input went into every candidate
    # 2 * MACs of convnext_atto at 64px, batch 2 (flop_counter; the paper's 0.55 GMACs at 224)
    assert res["gflop_per_batch"] == pytest.approx(2 * 2 * 0.5513e9 * (64 / 224) ** 2 / 1e9, rel=0.05)
    assert set(res["ratios"]) == {"timm", "onnxruntime", "openvino"}
    assert "optimized-eager" in res["ratios"]["openvino"]
    # the targets of this CPU class, against this run's ratios
    from convnext.utils import cpu_class

    goals = {t["peer"]: t["goal"] for t in res["targets"]}
    if cpu_class() in ("amx", "avx512", "avx2"):  # issue 24: level with the fastest peer, whichever it is
        assert goals == {"best of timm, onnxruntime, openvino": 1.0}
    assert "speed ours/timm (vs its fastest: timm" in bench.format_table(res)


def test_bench_train_cli_json(tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "convnext", "bench", "--model", "convnextv2_atto", "--mode", "train",
                        "--batch-size", "2", "--input-size", "32", "--repeats", "2", "--warmup", "1",
                        "--threads", "1", "--compare", "timm", "--optimize", "off", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "speed ours/timm" in r.stdout
    res = json.loads(out.read_text())
    assert res["config"]["mode"] == "train" and res["command"].startswith("convnext bench --model convnextv2_atto")
    assert [x["candidate"] for x in res["results"]] == ["convnext (nchw)", "timm (nchw)", "timm (channels_last)"]
    assert res["machine"]["torch"] and res["machine"]["cores"] >= 1
    # measured for each candidate alone (values: test_peak_memory_grows_with_the_activations, summary: below)
    assert all(x["peak_mib"] is not None for x in res["results"]) and "memory_ours_over_peer" in res["ratios"]["timm"]
    # an existing --json file is never overwritten without --force (checked before any measuring)
    before = out.read_text()
    again = subprocess.run([sys.executable, "-m", "convnext", "bench", "--model", "convnextv2_atto", "--json", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "pass --force" in again.stderr and out.read_text() == before


def test_peak_memory_grows_with_the_activations(tmp_path):
    """The fresh-process measurement sees a training step's activations: 16x the batch, clearly more memory."""
    from convnext.bench.candidates import Spec
    from convnext.bench.measure import peak_memory

    small, big = (peak_memory(Spec("convnext", "eager", "nchw", "convnext_atto", b, 96, "train", "fp32", "cpu", 1),
                              str(tmp_path)) for b in (2, 32))
    assert big > small + 20, (small, big)  # atto at 96 px keeps > 2 MiB of activations per image for backward


def test_summary_medians_ratios_and_fraction_of_peak():
    """`summarize` on known times: medians, img/s, GFLOP/s, share of peak, ratios against each peer's fastest."""
    from convnext.bench.candidates import Spec
    from convnext.bench.measure import Result

    rows = []
    for library, variant, layout, times, mib in [
        ("convnext", "eager", "nchw", [0.010, 0.030, 0.020], 120.0),  # median 20 ms
        ("convnext", "optimized", "nchw", [0.015, 0.016, 0.014], 80.0),  # median 15 ms (our best)
        ("timm", "eager", "nchw", [0.050, 0.040, 0.060], 150.0),  # median 50 ms
        ("timm", "eager", "channels_last", [0.030, 0.031, 0.029], 200.0),  # median 30 ms (timm's best)
    ]:
        r = Result(Spec(library, variant, layout, "convnext_atto", 4, 64, "infer", "fp32", "cpu", 1))
        r.times, r.peak_mib = times, mib
        rows.append(r)
    res = bench.summarize(rows, flops=2_000_000_000, peak=1000.0, peak_how="test", notes=[], skipped={})
    ours = res["results"][0]
    assert ours["ms_per_batch"] == pytest.approx(20.0) and ours["images_per_s"] == pytest.approx(200.0)
    assert ours["gflops_per_s"] == pytest.approx(100.0) and ours["fraction_of_peak"] == pytest.approx(0.1)
    assert res["ratios"]["timm"]["eager"] == pytest.approx(1.5) and res["ratios"]["timm"]["optimized"] == pytest.approx(2.0)
    assert res["ratios"]["timm"]["peer_best"] == "timm (channels_last)"
    assert res["ratios"]["timm"]["memory_ours_over_peer"] == pytest.approx(80 / 200)
    table = bench.format_table(res)
    assert "speed ours/timm (vs its fastest: timm (channels_last)): eager 1.50x, optimized 2.00x; memory ours/peer 0.40" in table


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
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_bench_contention_times_each_policy_quiet_and_busy(tmp_path, capsys):
    from helpers import run_main

    from convnext.bench.contention import CANDIDATES, bench_contention, format_contention_table

    res = bench_contention("convnext_atto", 2, 32, steps=1, repeats=1, progress=False,
                           candidates=(CANDIDATES[0], CANDIDATES[-1]))  # the default and 1 thread: each a process
    assert [r["candidate"] for r in res["rows"]] == ["libgomp default (spin 300000)", "1 thread"]
    assert all(r["quiet_img_s"] > 0 and r["busy_img_s"] > 0 for r in res["rows"])
    assert res["rows"][0]["quiet_vs_default_quiet"] == 1.0 and res["rows"][-1]["threads"] == 1
    assert "busy/def" in format_contention_table(res)
    code, _, err = run_main(capsys, "bench", "--mode", "contention", "--model", "convnext_nope", "--json", "-")
    assert code == 2 and "unknown model" in err
