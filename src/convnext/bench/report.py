"""The benchmark's summary (medians, ratios against each peer's fastest layout) and its table."""

from __future__ import annotations

import statistics

from .machine import machine
from .measure import Result


def summarize(results: list[Result], flops: int, peak: float, peak_how: str, notes: list[str],
              skipped: dict[str, str]) -> dict:
    spec = results[0].spec
    rows = []
    for r in results:
        med = statistics.median(r.times)
        rows.append({"candidate": r.spec.label, "library": r.spec.library, "variant": r.spec.variant,
                     "layout": r.spec.layout, "ms_per_batch": med * 1e3, "images_per_s": spec.batch_size / med,
                     "gflops_per_s": flops / med / 1e9, "fraction_of_peak": flops / med / 1e9 / peak,
                     "peak_mib": r.peak_mib, "setup_s": r.setup_s, "max_abs_diff_vs_ours": r.max_abs_diff,
                     "times_ms": [t * 1e3 for t in r.times]})
    ours = {row["variant"]: row for row in rows if row["library"] == "convnext"}
    best_ours = min(ours.values(), key=lambda row: row["ms_per_batch"])
    ratios = {}
    for lib in dict.fromkeys(row["library"] for row in rows if row["library"] != "convnext"):
        best_peer = min((row for row in rows if row["library"] == lib), key=lambda row: row["ms_per_batch"])
        ratios[lib] = {v: best_peer["ms_per_batch"] / row["ms_per_batch"] for v, row in ours.items()}
        ratios[lib]["peer_best"] = best_peer["candidate"]
        if best_peer["peak_mib"] and best_ours["peak_mib"]:
            ratios[lib]["memory_ours_over_peer"] = best_ours["peak_mib"] / best_peer["peak_mib"]
    return {"config": {k: v for k, v in spec.__dict__.items() if k not in ("library", "variant", "layout")},
            "machine": machine(), "gflop_per_batch": flops / 1e9, "matmul_peak_gflops": peak,
            "matmul_peak_how": peak_how, "repeats": len(results[0].times), "results": rows, "ratios": ratios,
            "skipped": skipped, "notes": notes}


def format_table(res: dict) -> str:
    c, m = res["config"], res["machine"]
    lines = [f"{c['model']} {c['mode']} {c['precision']}  batch {c['batch_size']}  {c['input_size']}px  "
             f"{c['device']} {c['threads']} threads  ({m['cpu']}{', ' + m['gpu'] if 'gpu' in m else ''}; "
             f"torch {m['torch']})",
             f"{res['gflop_per_batch']:.1f} GFLOP per batch (flop_counter); matmul peak "
             f"{res['matmul_peak_gflops']:.0f} GFLOP/s ({res['matmul_peak_how']}); medians of {res['repeats']}",
             "",
             f"{'candidate':<34} {'ms/batch':>9} {'img/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'peak MiB':>9} "
             f"{'max|diff|':>9}"]
    for r in res["results"]:
        mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        diff = f"{r['max_abs_diff_vs_ours']:9.1e}" if r["max_abs_diff_vs_ours"] is not None else f"{'-':>9}"
        lines.append(f"{r['candidate']:<34} {r['ms_per_batch']:9.1f} {r['images_per_s']:8.1f} "
                     f"{r['gflops_per_s']:8.1f} {100 * r['fraction_of_peak']:5.0f}% {mem} {diff}")
    lines.append("")
    for lib, rt in res["ratios"].items():
        parts = ", ".join(f"{v} {x:.2f}x" for v, x in rt.items() if v not in ("peer_best", "memory_ours_over_peer"))
        mem = f"; memory ours/peer {rt['memory_ours_over_peer']:.2f}" if "memory_ours_over_peer" in rt else ""
        lines.append(f"speed ours/{lib} (vs its fastest: {rt['peer_best']}): {parts}{mem}")
    for peer, why in res["skipped"].items():
        lines.append(f"skipped {peer}: {why}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
