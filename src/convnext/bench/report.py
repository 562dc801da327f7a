"""The benchmark's summary (medians, ratios against each peer's fastest configuration, the targets of
this CPU class) and its table."""

from __future__ import annotations

import statistics

from .machine import machine
from .measure import Result

# (mode, precision) -> [(peer group, minimum ratio ours / the group's fastest)] per CPU class (issue 24's
# targets, set against the peers: "2x eager timm" inference is retired, above the roofline on these CPUs).
# "timm": eager timm in either layout or compiled timm, the fastest; "all": every peer of the run, the fastest.
_NATIVE_BF16 = {("infer", "fp32"): [("all", 1.0)], ("infer", "bf16"): [("all", 1.0)],
                ("train", "fp32"): [("timm", 1.2)], ("train", "bf16"): [("timm", 1.5)]}
TARGETS = {
    "amx": _NATIVE_BF16,  # AMX-BF16 (Sapphire Rapids and later)
    "avx512": _NATIVE_BF16,  # AVX-512 with avx512_bf16 (Zen 4/5)
    "avx2": {("infer", "fp32"): [("all", 1.0)], ("train", "fp32"): [("timm", 1.2)]},
}
_GROUPS = {"timm": ("timm", "timm+compile")}


def summarize(results: list[Result], flops: int, peak: float, peak_how: str, notes: list[str],
              skipped: dict[str, str]) -> dict:
    spec = results[0].spec
    rows = []
    for r in results:
        med = statistics.median(r.times)
        rows.append({"candidate": r.spec.label, "library": r.spec.library, "variant": r.spec.variant,
                     "peer": r.spec.peer, "layout": r.spec.layout, "ms_per_batch": med * 1e3,
                     "images_per_s": spec.batch_size / med, "gflops_per_s": flops / med / 1e9,
                     "fraction_of_peak": flops / med / 1e9 / peak, "peak_mib": r.peak_mib, "setup_s": r.setup_s,
                     "max_abs_diff_vs_ours": r.max_abs_diff, "detail": r.detail,
                     "times_ms": [t * 1e3 for t in r.times]})
    ours = {row["variant"]: row for row in rows if row["library"] == "convnext"}
    best_ours = min(ours.values(), key=lambda row: row["ms_per_batch"])
    ratios = {}
    for peer in dict.fromkeys(row["peer"] for row in rows if row["library"] != "convnext"):
        best_peer = min((row for row in rows if row["peer"] == peer), key=lambda row: row["ms_per_batch"])
        ratios[peer] = {v: best_peer["ms_per_batch"] / row["ms_per_batch"] for v, row in ours.items()}
        ratios[peer]["peer_best"] = best_peer["candidate"]
        if best_peer["peak_mib"] and best_ours["peak_mib"]:
            ratios[peer]["memory_ours_over_peer"] = best_ours["peak_mib"] / best_peer["peak_mib"]
    info = machine()
    return {"config": {k: v for k, v in spec.__dict__.items() if k not in ("library", "variant", "layout")},
            "machine": info, "gflop_per_batch": flops / 1e9, "matmul_peak_gflops": peak,
            "matmul_peak_how": peak_how, "repeats": len(results[0].times), "results": rows, "ratios": ratios,
            "ours_best": best_ours["candidate"], "targets": targets(info["cpu_class"], spec, best_ours, ratios),
            "skipped": skipped, "notes": notes}


def targets(cpu_class: str, spec, best_ours: dict, ratios: dict) -> list[dict]:
    """This run's ratios against the targets of its CPU class (ours = our fastest variant)."""
    out = []
    for peer, goal in TARGETS.get(cpu_class, {}).get((spec.mode, spec.precision), []):
        names = [p for p in (list(ratios) if peer == "all" else _GROUPS.get(peer, (peer,))) if p in ratios]
        if not names:
            out.append({"peer": peer, "goal": goal, "ratio": None, "met": None})
            continue
        ratio = min(ratios[p][best_ours["variant"]] for p in names)
        out.append({"peer": "best of " + ", ".join(names) if len(names) > 1 else names[0], "goal": goal,
                    "ratio": ratio, "met": ratio >= goal})
    return out


def format_table(res: dict) -> str:
    c, m = res["config"], res["machine"]
    lines = [f"{c['model']} {c['mode']} {c['precision']}  batch {c['batch_size']}  {c['input_size']}px  "
             f"{c['device']} {c['threads']} threads  ({m['cpu']}{', ' + m['gpu'] if 'gpu' in m else ''}; "
             f"CPU class {m['cpu_class']}: {m['cpu_capability']}{', native bf16' if m['native_bf16'] else ''}; "
             f"torch {m['torch']})",
             f"{res['gflop_per_batch']:.1f} GFLOP per batch (flop_counter); matmul peak "
             f"{res['matmul_peak_gflops']:.0f} GFLOP/s ({res['matmul_peak_how']}); medians of {res['repeats']}",
             "",
             f"{'candidate':<34} {'ms/batch':>9} {'img/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'peak MiB':>9} "
             f"{'max|diff|':>9} {'setup s':>8}"]
    for r in res["results"]:
        mem = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        diff = f"{r['max_abs_diff_vs_ours']:9.1e}" if r["max_abs_diff_vs_ours"] is not None else f"{'-':>9}"
        lines.append(f"{r['candidate']:<34} {r['ms_per_batch']:9.1f} {r['images_per_s']:8.1f} "
                     f"{r['gflops_per_s']:8.1f} {100 * r['fraction_of_peak']:5.0f}% {mem} {diff} {r['setup_s']:8.1f}")
    lines += [f"  {r['candidate']}: {r['detail']}" for r in res["results"] if r.get("detail")]
    lines.append("")
    for peer, rt in res["ratios"].items():
        parts = ", ".join(f"{v} {x:.2f}x" for v, x in rt.items() if v not in ("peer_best", "memory_ours_over_peer"))
        mem = f"; memory ours/peer {rt['memory_ours_over_peer']:.2f}" if "memory_ours_over_peer" in rt else ""
        lines.append(f"speed ours/{peer} (vs its fastest: {rt['peer_best']}): {parts}{mem}")
    for t in res.get("targets", []):
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "-"
        lines.append(f"target ({m['cpu_class']}): ours ({res['ours_best']}) / {t['peer']} >= {t['goal']:.1f}x: "
                     f"{value}, {state}")
    for peer, why in res["skipped"].items():
        lines.append(f"skipped {peer}: {why}")
    for note in res["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
