"""`convnext` command line: parse, then call one library function per command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger("convnext")


def _cmd_list(args: argparse.Namespace) -> None:
    import torch

    from .factory import create_model, list_models
    from .models.flops import count_macs, count_params
    from .weights import PRETRAINED

    names = list_models(args.pattern if any(c in args.pattern for c in "*?[") else f"*{args.pattern}*")
    if not names:
        raise ValueError(f"no model matches {args.pattern!r} (`convnext list` shows all)")
    print(f"{'model':<26} {'params (M)':>10} {'GFLOPs*':>9}  weights")
    for name in names:
        with torch.device("meta"):  # shapes only: counts without allocating weights
            model = create_model(name)
            params, macs = count_params(model), count_macs(model, 224)
        tags = [t.split(".", 1)[1] for t in PRETRAINED if t.split(".", 1)[0] == name]
        print(f"{name:<26} {params / 1e6:>10.2f} {macs / 1e9:>9.2f}  {', '.join(tags) or '-'}")
    print("* at 224x224, counted as the papers do: one multiply-accumulate = one FLOP (fvcore convention)")


def _cmd_info(args: argparse.Namespace) -> None:
    import dataclasses

    import torch

    from .factory import check_model_name, create_model
    from .models.flops import count_macs, count_params
    from .weights import PRETRAINED

    name = check_model_name(args.name.split(".", 1)[0])
    with torch.device("meta"):
        model = create_model(name)
        params, macs = count_params(model), count_macs(model, 224)
    print(f"{name}: {type(model).__name__}, {params:,} parameters, {macs / 1e9:.2f} GFLOPs (multiply-accumulates) "
          f"at 224x224")
    for k, v in dataclasses.asdict(model.cfg).items():
        print(f"  {k:<16} {v}")
    tags = {t: w for t, w in PRETRAINED.items() if t.split(".", 1)[0] == name}
    print(f"weights ({len(tags)}):" if tags else "weights: none published")
    for tag, w in tags.items():
        top1 = f"top-1 {w.top1:.1f}" if w.top1 else ""
        print(f"  {tag:<42} {w.num_classes:>5} classes  {w.input_size}px crop {w.crop_pct:.3f} "
              f"{w.interpolation:<8} {w.license:<13} {top1}")
        print(f"      {w.url}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .factory import check_model_name, create_model, infer_model_name
    from .weights import read_checkpoint, save_checkpoint, to_ours, unwrap

    obj, _ = read_checkpoint(args.src)
    state_dict = unwrap(obj, args.key)
    fmt, ours = to_ours(state_dict)
    name = check_model_name(args.model) if args.model else infer_model_name(ours, args.src)
    model = create_model(name, pretrained=state_dict)
    save_checkpoint(model, args.dst, fmt=args.to)
    print(f"converted {fmt} checkpoint {args.src} -> {args.dst} ({name}, {args.to} layout)")


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import fit
    from .train.config import from_args

    cfg = from_args(args)  # validate here, before any process is launched
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(args)
        return
    summary = fit(cfg)
    if "val_acc1" in summary:
        print(f"done: {cfg.model} epoch {summary['epoch']}  val top-1 {summary['val_acc1']:.2f}%  "
              f"top-5 {summary['val_acc5']:.2f}%  best top-1 {summary['best_acc1']:.2f}%  -> {summary['output']}")


def _launch_torchrun(args: argparse.Namespace) -> None:
    """`convnext train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m convnext train ...`."""
    import subprocess

    argv, skip = [], False
    raw = sys.argv[1:] if args.argv is None else args.argv
    for a in raw:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           f"--max-restarts={args.max_restarts}", "-m", "convnext", *argv]
    logger.info("launching: %s", " ".join(cmd))
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(rc)


def _eval_root(data: str) -> Path:
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    return root / "val" if (root / "val").is_dir() else root


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    import torch
    from torch.utils.data import DataLoader

    from .data import ImageFolder, collate
    from .eval import evaluate, load_for_inference
    from .plots import plot_confusion

    model, info = load_for_inference(args.checkpoint, key=args.key)
    dataset = ImageFolder(_eval_root(args.data), transform=info.transform(), classes=info.classes)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    res = evaluate(model, loader, torch.device("cpu"), len(info.classes), precision=args.precision, progress=True)
    out = Path(args.output) if args.output else Path(args.checkpoint).resolve().parent
    plot_confusion(res["confusion"], info.classes, out / "confusion_matrix.png",
                   title=f"{info.model_name}: top-1 {res['acc1']:.2f}% on {res['count']} images")
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "confusion"} | {
            "classes": info.classes, "confusion": res["confusion"].tolist()}))
        return
    print(f"{info.model_name} on {dataset.root}: {res['count']} images  top-1 {res['acc1']:.2f}%  "
          f"top-5 {res['acc5']:.2f}%  loss {res['loss']:.4f}" + (f"  ({res['bad_images']} unreadable skipped)"
                                                                  if res["bad_images"] else ""))
    width = max(len(c) for c in info.classes)
    for c, acc, n in zip(info.classes, res["per_class_acc"], res["confusion"].sum(1).tolist()):
        print(f"  {c:<{width}}  {acc:6.2f}%  ({n} images)")
    print(f"confusion matrix: {out / 'confusion_matrix.png'}")


def _cmd_predict(args: argparse.Namespace) -> None:
    import csv
    import json

    from .eval import load_for_inference, predict
    from .eval.predict import expand_images

    if args.backend == "torch":
        model, info = load_for_inference(args.checkpoint, key=args.key)
    else:
        from .export import ExportedModel

        model = ExportedModel(args.checkpoint, args.backend)
        info = model.info
    results = predict(model, info, expand_images(args.images), topk=args.topk)
    if args.json:
        print(json.dumps(results, indent=2))
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["path", "rank", "class", "probability", "error"])
        for r in results:
            for k, (c, p) in enumerate(r.get("top", []), 1):
                w.writerow([r["path"], k, c, f"{p:.6f}", ""])
            if "error" in r:
                w.writerow([r["path"], "", "", "", r["error"]])
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: unreadable ({r['error']})")
            else:
                print(f"{r['path']}: " + ", ".join(f"{c} {100 * p:.1f}%" for c, p in r["top"]))


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from .bench import format_table, run

    compare = tuple(p for p in args.compare.split(",") if p) if args.compare else ()
    res = run(args.model, args.batch_size, args.input_size, args.mode, args.precision, compare, args.repeats,
              args.warmup, args.device, args.threads, args.compile, memory=not args.no_memory,
              progress=args.json != "-")
    res["command"] = "convnext " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
    if args.json != "-":
        print(format_table(res))
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


def _cmd_export(args: argparse.Namespace) -> None:
    from .eval import load_for_inference
    from .export import FORMATS, export_model

    fmt = args.format
    out = Path(args.output) if args.output else Path(args.checkpoint).with_suffix(FORMATS[fmt])
    model, info = load_for_inference(args.checkpoint, key=args.key)
    if args.input_size:
        info.input_size = args.input_size
    path = export_model(model, info, out, fmt, dynamic_size=not args.static_size)
    size = "dynamic batch and image size" if not args.static_size and fmt != "torchscript" else "dynamic batch"
    print(f"exported {info.model_name} ({len(info.classes)} classes) as {fmt} to {path} ({size}; "
          f"preprocessing: {info.input_size}px, crop {info.crop_pct}, mean/std embedded)")


def _cmd_demo(args: argparse.Namespace) -> None:
    import time

    from .data.fashion_mnist import prepare
    from .train import fit
    from .train.config import TrainConfig, load_yaml

    t0 = time.perf_counter()
    out = Path(args.output)
    data = prepare(out / "data")
    recipe = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    values = load_yaml(recipe) | {"data": str(data), "output": str(out / "train")}
    if args.epochs:  # keep the recipe's warm-up share of the schedule (1 of 6 epochs)
        values["warmup_epochs"] = values.get("warmup_epochs", 0) * args.epochs / values["epochs"]
        values["epochs"] = args.epochs
    cfg = TrainConfig(**values)
    print(f"demo: training {cfg.model} on Fashion-MNIST ({data}) with {recipe.name}, {cfg.epochs} epochs")
    summary = fit(cfg)
    train_min = (time.perf_counter() - t0) / 60
    best = out / "train" / "best.safetensors"
    print(f"\n== evaluate {best}")
    parser = build_parser()  # the same arguments and defaults as typing the commands
    _cmd_eval(parser.parse_args(["eval", "--checkpoint", str(best), "--data", str(data), "--batch-size", "256",
                                 "--output", str(out / "train")]))
    samples = sorted((data / "val").glob("*/*.png"))[::1000][:5]
    print("\n== predict")
    _cmd_predict(parser.parse_args(["predict", *map(str, samples), "--checkpoint", str(best), "--topk", "3"]))
    from .bench import cpu_name

    cpu = cpu_name()
    print(f"\ndemo result: {cfg.model} reached {summary['val_acc1']:.2f}% top-1 (best {summary['best_acc1']:.2f}%) on "
          f"the 10,000 Fashion-MNIST test images in {train_min:.1f} min (data + training) on "
          f"{os.cpu_count()} CPU cores ({cpu}), "
          f"torch {__import__('torch').__version__}. Outputs: {out / 'train'} (metrics.jsonl, curves.png, "
          f"confusion_matrix.png, best.safetensors, last.pt)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="convnext", description="ConvNeXt V1/V2 models, weights and training.")
    parser.add_argument("--version", action="version", version=f"convnext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list models with params, GMACs and weight tags")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern or substring, e.g. 'convnextv2_*'")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a model's config and its published weights")
    p.add_argument("name", help="model name, e.g. convnext_tiny")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert any supported checkpoint to safetensors")
    p.add_argument("src", help="checkpoint: official, FCMAE, timm, torchvision, Hugging Face (file or dir), ours")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", help="architecture name (inferred from the weights when omitted)")
    p.add_argument("--key", help="state dict key inside the file, e.g. model_ema")
    p.add_argument("--to", default="ours", choices=["ours", "official", "official_isotropic", "timm",
                                                   "torchvision", "hf"], help="layout to write (default: ours)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="train with the ConvNeXt recipe on an image folder")
    from .train.config import add_arguments

    add_arguments(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: launches torchrun --standalone for you (default: 1)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restarts after a failure, each resuming from the last checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="top-1/top-5, loss, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="best.safetensors, last.pt or any supported checkpoint")
    p.add_argument("--data", required=True, help="folder of <class>/<image> (or a root holding val/)")
    p.add_argument("--key", help="state dict key, e.g. model_ema for a training checkpoint's EMA weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--output", help="folder for confusion_matrix.png (default: beside the checkpoint)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images with a trained checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--key", help="state dict key, e.g. model_ema")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "torchscript", "torch-export"],
                   help="torch: a checkpoint; others: a file from `convnext export` (default: torch)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript or torch.export for deployment")
    p.add_argument("--checkpoint", required=True, help="best.safetensors, last.pt or any supported checkpoint")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "torch-export"])
    p.add_argument("--output", help="output file (default: the checkpoint's name with .onnx/.pt/.pt2)")
    p.add_argument("--key", help="state dict key, e.g. model_ema")
    p.add_argument("--input-size", type=int, help="preprocessing input size to record (default: the checkpoint's)")
    p.add_argument("--static-size", action="store_true", help="fix the image size (batch stays dynamic)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="speed against timm/torchvision/ONNX Runtime, measured side by side")
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="fp32, or autocast to bf16/fp16 (LayerNorm/GRN statistics stay fp32)")
    p.add_argument("--compare", default="timm,torchvision",
                   help="comma-separated peers: timm, torchvision, onnxruntime ('' for none)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds; each runs every candidate once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--compile", action="store_true", help="also benchmark torch.compile (with freezing for infer)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-candidate peak-memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': only JSON, to stdout)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the main job: train on embedded Fashion-MNIST, evaluate, predict")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"convnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a non-finite loss under --nan-policy abort
        from .train.loop import NonFiniteLossError

        if args.debug or not isinstance(e, NonFiniteLossError):
            raise
        print(f"convnext {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
