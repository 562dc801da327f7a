"""The demo's curves in both training precisions, one figure (benchmarks/README.md, README "The demo").

    python benchmarks/plot_demo_precisions.py OUT.png LABEL=RUN_DIR LABEL=RUN_DIR ...

Each RUN_DIR holds a `metrics.jsonl` (e.g. `runs/demo/train` of `convnext demo` and a
`convnext train --config demo --precision fp32` run); its lines are copied beside OUT as LABEL.metrics.jsonl.
"""

import json
import sys
from pathlib import Path

from convnext.plots import plot_comparison


def main(out: str, *runs: str) -> None:
    histories = {}
    for run in runs:
        label, _, folder = run.partition("=")
        lines = (Path(folder) / "metrics.jsonl").read_text()
        histories[label] = [json.loads(line) for line in lines.splitlines()]
        Path(out).with_name(f"{Path(out).stem}-{label.split()[0]}.metrics.jsonl").write_text(lines)
    plot_comparison(histories, ("train_loss", "val_loss", "val_acc1"), out)
    for label, h in histories.items():
        print(f"{label}: val_acc1 {h[-1]['val_acc1']:.2f}, "
              f"train {sum(x['train_time_s'] for x in h):.0f} s, {h[-1]['train_img_s']:.0f} img/s in the last epoch")


if __name__ == "__main__":
    main(*sys.argv[1:])
