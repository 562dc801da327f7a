"""The dense demos (`convnext demo --task detect|segment`): one run for either task, through its `TaskSpec`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAIN_SCENES = 3000


def run(spec, recipe_name: str, *, output: str | None, epochs: int | None, backbone: str | None,
        scenes: int | None, force: bool, metric: str, what: Callable[[Any], str], samples: str,
        predict_options: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate scenes (Fashion-MNIST garments on photographs), train the task's packaged demo recipe on
    convnext_atto, evaluate on 500 held-out scenes, draw predictions of four. `backbone`: initialise the
    backbone from a checkpoint (e.g. the classification demo's runs/demo/train/best.safetensors); `scenes`:
    training scenes to generate. The task says: `metric` (of the summary line), `what(cfg)` (how to call the
    model), `samples` (the folder of `data` the predicted images come from), `predict_options`, `overrides` (of
    the recipe's fields)."""
    from ..data.scenes import write_scenes
    from ..eval.predict import run_predictor
    from ..utils import machine_line
    from .config import recipe
    from .engine import fit

    t0 = time.perf_counter()
    out = Path(output or f"runs/demo-{spec.name}")
    data = write_scenes(out / "data", spec.name, n_train=scenes or TRAIN_SCENES, n_val=500)
    cfg = recipe(recipe_name, spec.config, epochs=epochs, data=str(data), output=str(out / "train"), force=force,
                 **({"pretrained": str(backbone)} if backbone else {}), **(overrides or {}))
    what = what(cfg)
    print(f"demo: training {what} on {cfg.model} ({'backbone from ' + str(backbone) if backbone else 'from scratch'}) "
          f"on generated scenes ({data}), {cfg.epochs} epochs")
    summary = fit(spec.task(cfg))
    minutes = (time.perf_counter() - t0) / 60
    best = out / "train" / "best.safetensors"
    print(f"\n== evaluate {best}")
    print(spec.format_results(spec.evaluate(best, str(data), progress=False), "text"))
    images = sorted((data / samples).glob("*.jpg"))[:4]
    run_predictor(spec.predictor(best, images, output=out / "predict", force=True, **(predict_options or {})), images)
    extra = f", mask mAP@0.5 {summary['segm_mAP_50']:.3f}" if "segm_mAP_50" in summary else ""
    print(f"\ndemo result: {what} on {cfg.model} reached {metric} {summary[metric]:.3f}{extra} on 500 held-out scenes "
          f"in {minutes:.1f} min (data + training) {machine_line()}. Outputs: {out / 'train'} (metrics.jsonl, "
          f"curves.png, best.safetensors, last.pt), {out / 'predict'} (drawn predictions)")
    return summary | {"minutes": minutes}
