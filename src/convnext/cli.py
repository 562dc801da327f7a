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
    from .factory import describe_model, list_models

    names = list_models(args.pattern if any(c in args.pattern for c in "*?[") else f"*{args.pattern}*")
    if not names:
        raise ValueError(f"no model matches {args.pattern!r} (`convnext list` shows all)")
    print(f"{'model':<26} {'params (M)':>10} {'GFLOPs*':>9}  weights")
    for name in names:
        m = describe_model(name)
        tags = [t.split(".", 1)[1] for t in m.weights]
        print(f"{name:<26} {m.params / 1e6:>10.2f} {m.macs / 1e9:>9.2f}  {', '.join(tags) or '-'}")
    print("* at 224x224, counted as the papers do: one multiply-accumulate = one FLOP (fvcore convention)")


def _cmd_info(args: argparse.Namespace) -> None:
    from .factory import describe_model
    from .weights import PRETRAINED

    m = describe_model(args.name)
    print(f"{m.name}: {m.architecture}, {m.params:,} parameters, {m.macs / 1e9:.2f} GFLOPs (multiply-accumulates) "
          f"at {m.input_size}x{m.input_size}")
    for k, v in m.config.items():
        print(f"  {k:<16} {v}")
    print(f"weights ({len(m.weights)}):" if m.weights else "weights: none published")
    for tag in m.weights:
        w, pre = PRETRAINED[tag], PRETRAINED[tag].preprocess
        top1 = f"top-1 {w.top1:.1f}" if w.top1 else ""
        print(f"  {tag:<42} {w.num_classes:>5} classes  {pre.input_size}px crop {pre.crop_pct:.3f} "
              f"{pre.interpolation:<8} {w.license:<13} {top1}")
        print(f"      {w.url}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from .factory import convert_checkpoint

    fmt, name = convert_checkpoint(args.src, args.dst, to=args.to, key=args.key, model=args.model, force=args.force)
    print(f"converted {fmt} checkpoint {args.src} -> {args.dst} ({name}, {args.to} layout)")


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import ClassificationTask, fit
    from .train.config import from_args

    cfg = from_args(args)  # validate here, before any process is launched
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(args)
        return
    s = fit(ClassificationTask(cfg))
    if "val_acc1" in s and int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, rank 0's
        print(f"done: {cfg.model} epoch {s['epoch']}  val top-1 {s['val_acc1']:.2f}%  top-5 {s['val_acc5']:.2f}%  "
              f"best top-1 {s['best']:.2f}%  -> {s['output']}")


def _task_classes(command: str):
    """(config class, task class) of the engine tasks other than classification."""
    if command == "detect":
        from .train.detection import DetectConfig, DetectionTask

        return DetectConfig, DetectionTask
    if command == "pretrain":
        from .train.pretrain import PretrainConfig, PretrainTask

        return PretrainConfig, PretrainTask
    from .train.segmentation import SegmentConfig, SegmentationTask

    return SegmentConfig, SegmentationTask


def _cmd_dense_train(args: argparse.Namespace) -> None:
    from .train import fit
    from .train.config import from_args

    config_cls, task_cls = _task_classes(args.command)
    cfg = from_args(args, config_cls)  # validate here, before any process is launched
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(args)
        return
    s = fit(task_cls(cfg))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one summary, rank 0's
        return
    shown = "  ".join(f"{k} {s[k]:.4f}" for k in ("bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50", "mIoU", "mAcc",
                                                   "train_loss", "probe_loss") if k in s)
    print(f"done: {cfg.model} epoch {s['epoch']}  {shown}  best {s['best_metric']} {s['best']:.4f}  -> {s['output']}")


def _cmd_dense_eval(args: argparse.Namespace) -> None:
    import json

    from .eval.dense import evaluate_dense_checkpoint, format_dense_results

    res = evaluate_dense_checkpoint(args.checkpoint, args.data, batch_size=args.batch_size, workers=args.workers,
                                    precision=args.precision, ema=args.ema, ann=getattr(args, "val_ann", None),
                                    images=getattr(args, "val_images", None), progress=not args.json)
    if (res["task"] == "detect") != (args.command == "detect"):
        raise ValueError(f"{args.checkpoint} is a {res['task']} checkpoint: use `convnext {res['task']} eval`")
    print(json.dumps(res) if args.json else format_dense_results(res))


def _cmd_dense_predict(args: argparse.Namespace) -> int:
    import json

    from .eval.dense import predict_dense

    report = predict_dense(args.checkpoint, args.images, args.output, score_threshold=args.score_threshold,
                           ema=args.ema, force=args.force)
    for r in report:
        if "error" in r:
            print(f"convnext {args.command} predict: cannot read {r['path']} ({r['error']})", file=sys.stderr)
        elif args.json:
            print(json.dumps(r))
        else:
            print(f"{r['path']}: {', '.join(r.get('labels', r.get('classes', []))) or 'nothing found'}")
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if any("error" in r for r in report) else 0


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


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from .eval import evaluate_checkpoint, format_results

    res = evaluate_checkpoint(args.checkpoint, args.data, key=args.key, batch_size=args.batch_size,
                              workers=args.workers, precision=args.precision, output=args.output,
                              optimize=not args.no_optimize)
    if args.json:
        keep = ("loss", "acc1", "acc5", "count", "bad_images", "per_class_acc", "classes")
        print(json.dumps({k: res[k] for k in keep} | {"confusion": res["confusion"].tolist()}))
    else:
        print(format_results(res))


def _cmd_predict(args: argparse.Namespace) -> int:
    from .eval import format_predictions, predict_files

    results = predict_files(args.checkpoint, args.images, backend=args.backend, key=args.key, topk=args.topk,
                            precision=args.precision, optimize=not args.no_optimize)
    print(format_predictions([r for r in results if "top" in r or args.json or args.csv],
                             "json" if args.json else "csv" if args.csv else "text"))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"convnext predict: cannot read {r['path']} ({r['error']})", file=sys.stderr)
    return 1 if failed else 0  # as cp and grep: scripts notice that some inputs failed


def _cmd_bench(args: argparse.Namespace) -> None:
    import json

    from .bench import BenchOptions, format_table, run
    from .utils import atomic_write, check_output

    if args.json and args.json != "-":
        check_output(args.json, force=args.force, suffixes=(".json",))
    res = run(BenchOptions(
        model=args.model, batch_size=args.batch_size, input_size=args.input_size, mode=args.mode,
        precision=args.precision, compare=tuple(p for p in args.compare.split(",") if p), repeats=args.repeats,
        warmup=args.warmup, device=args.device, threads=args.threads, compile=args.compile,
        optimize=args.optimize, memory=not args.no_memory, progress=args.json != "-"))
    res["command"] = "convnext " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
    if args.json != "-":
        print(format_table(res))
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text + "\n"))


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    path, info = export_checkpoint(args.checkpoint, args.format, args.output, key=args.key,
                                   input_size=args.input_size, dynamic_size=not args.static_size, force=args.force)
    pre = info.preprocess
    size = "dynamic batch and image size" if not args.static_size and args.format != "torchscript" else "dynamic batch"
    print(f"exported {info.model_name} ({len(info.classes)} classes) as {args.format} to {path} ({size}; "
          f"preprocessing: {pre.input_size}px, crop {pre.crop_pct}, mean/std embedded)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo, run_dense_demo, run_fcmae_demo

    if args.task == "fcmae":
        if args.backbone or args.scenes or args.per_class:
            raise ValueError("--backbone, --scenes and --per-class are not for --task fcmae")
        run_fcmae_demo(args.output or "runs/demo-fcmae", force=args.force, epochs=args.epochs,
                       pretrain_epochs=args.pretrain_epochs)
        return
    if args.pretrain_epochs:
        raise ValueError("--pretrain-epochs is for --task fcmae")
    if args.task == "classify":
        if args.backbone or args.scenes:
            raise ValueError("--backbone and --scenes are for --task detect|segment")
        run_demo(args.output or "runs/demo", epochs=args.epochs, per_class=args.per_class, force=args.force)
        return
    if args.per_class:
        raise ValueError("--per-class is for the classification demo; use --scenes for detect|segment")
    run_dense_demo(args.task, args.output, epochs=args.epochs, backbone=args.backbone, scenes=args.scenes,
                   force=args.force)


def _add_list_info_convert(sub) -> None:
    from .weights import TABLES

    p = sub.add_parser("list", help="list models with params, GMACs and weight tags")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern or substring, e.g. 'convnextv2_*'")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="show a model's config and its published weights")
    p.add_argument("name", help="model name, e.g. convnext_tiny")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("convert", help="convert any supported checkpoint to safetensors")
    p.add_argument("src", help="checkpoint: official, FCMAE, timm, torchvision, Hugging Face (file or dir), ours")
    p.add_argument("dst", help="output .safetensors file (--to fcmae: .pt, .pth or .safetensors)")
    p.add_argument("--model", help="architecture name (inferred from the weights when omitted)")
    p.add_argument("--key", help="state dict key inside the file, e.g. model_ema")
    p.add_argument("--to", default="ours", choices=["ours", *TABLES, "fcmae"],
                   help="layout to write (default: ours); fcmae: a whole pre-training model (convnext pretrain's "
                        "last.pt) in the official FCMAE layout, as a .pt file the official code loads")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_convert)


def _add_train_eval_predict(sub) -> None:
    from .export import BACKENDS
    from .train.config import add_arguments

    p = sub.add_parser("train", help="train with the ConvNeXt recipe on an image folder")
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
    p.add_argument("--no-optimize", action="store_true",
                   help="run the model as it is (default: optimize_for_inference: fused, compiled when it pays)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images with a trained checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--key", help="state dict key, e.g. model_ema")
    p.add_argument("--topk", type=int, help="classes per image, 1 .. the model's classes (default: 5, or all if fewer)")
    p.add_argument("--backend", default="torch", choices=["torch", *BACKENDS],
                   help="torch: a checkpoint; others: a file from `convnext export` (default: torch)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: a bf16 model (LayerNorm/GRN statistics in fp32); OpenVINO's precision hint")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the model as it is (default: optimize_for_inference: fused, compiled when it pays)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    p.set_defaults(func=_cmd_predict)


def _add_dense(sub) -> None:
    from .train.config import add_arguments

    for command, what in (("detect", "object detection and instance segmentation (Mask/Faster R-CNN, RetinaNet, "
                                     "FCOS) on COCO-format data"),
                          ("segment", "semantic segmentation (UperNet) on ADE20K-layout data")):
        config_cls, _ = _task_classes(command)
        top = sub.add_parser(command, help=what)
        actions = top.add_subparsers(dest="action", required=True, metavar="ACTION")
        p = actions.add_parser("train", help=f"train a {command} model on the shared engine")
        add_arguments(p, config_cls)
        p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
        p.add_argument("--max-restarts", type=int, default=0)
        p.set_defaults(func=_cmd_dense_train)

        p = actions.add_parser("eval", help="COCO box/mask AP" if command == "detect" else "mIoU, mAcc, aAcc")
        p.add_argument("--checkpoint", required=True, help="best.safetensors or last.pt of a training run")
        p.add_argument("--data", required=True)
        if command == "detect":
            p.add_argument("--val-ann", help="annotation file (default: DATA/annotations/instances_val.json)")
            p.add_argument("--val-images", help="image folder (default: DATA/val)")
        p.add_argument("--ema", action="store_true", help="the EMA weights of a last.pt")
        p.add_argument("--batch-size", type=int, default=4)
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_dense_eval)

        p = actions.add_parser("predict", help="draw predictions into images, with "
                               + ("COCO-results JSON" if command == "detect" else "class-index mask PNGs"))
        p.add_argument("images", nargs="+", help="image files or folders")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--output", required=True, help="folder for the drawn images and results")
        p.add_argument("--score-threshold", type=float, default=0.5, help="detections below are not kept")
        p.add_argument("--ema", action="store_true")
        p.add_argument("--force", action="store_true", help="overwrite existing files in --output")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_cmd_dense_predict)


def _add_pretrain(sub) -> None:
    from .train.config import add_arguments

    config_cls, _ = _task_classes("pretrain")
    p = sub.add_parser("pretrain", help="FCMAE self-supervised pre-training (ConvNeXt V2) on a folder of images")
    add_arguments(p, config_cls)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine (launches torchrun)")
    p.add_argument("--max-restarts", type=int, default=0)
    p.set_defaults(func=_cmd_dense_train)


def _add_export_bench_demo(sub) -> None:
    from .bench import MODES, OPTIMIZE, PEERS
    from .export import FORMATS
    from .utils import PRECISIONS

    p = sub.add_parser("export", help="export a checkpoint to ONNX, TorchScript or torch.export for deployment")
    p.add_argument("--checkpoint", required=True, help="best.safetensors, last.pt or any supported checkpoint")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--output", help="output file (default: beside the checkpoint, its name with .onnx/.pt/.pt2; "
                                    "never the checkpoint itself)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", help="state dict key, e.g. model_ema")
    p.add_argument("--input-size", type=int, help="preprocessing input size to record (default: the checkpoint's)")
    p.add_argument("--static-size", action="store_true", help="fix the image size (batch stays dynamic)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help=f"speed against {', '.join(PEERS)}, measured side by side")
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mode", choices=list(MODES), default="infer")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32, or autocast to bf16/fp16 (LayerNorm/GRN statistics stay fp32)")
    p.add_argument("--compare", default="timm,torchvision",
                   help=f"comma-separated peers: {', '.join(PEERS)} ('' for none; default: timm,torchvision)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds; each runs every candidate once")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--compile", action="store_true",
                   help="also the peers under torch.compile (with inductor freezing for inference), and ours in training")
    p.add_argument("--optimize", choices=list(OPTIMIZE), default="compile",
                   help="ours through optimize_for_inference: compile (times eager and compiled, keeps the faster; "
                        "default), eager (no compiling), off")
    p.add_argument("--no-memory", action="store_true", help="skip the per-candidate peak-memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': only JSON, to stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("demo", help="the main job: train on embedded Fashion-MNIST, evaluate, predict")
    p.add_argument("--task", choices=["classify", "detect", "segment", "fcmae"], default="classify",
                   help="classify (default), detect / segment on generated scenes of garments on photographs, or "
                        "fcmae: FCMAE pre-training, then fine-tuning on 10%% of the labels vs from scratch")
    p.add_argument("--output", help="default: runs/demo (classify), runs/demo-detect, runs/demo-segment, runs/demo-fcmae")
    p.add_argument("--backbone", help="detect/segment: initialise the backbone from this checkpoint "
                                      "(e.g. runs/demo/train/best.safetensors)")
    p.add_argument("--scenes", type=int, help="detect/segment: number of training scenes to generate")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs (fcmae: of the labelled runs)")
    p.add_argument("--pretrain-epochs", type=int, help="fcmae: override the pre-training epochs")
    p.add_argument("--per-class", type=int, help="use only the first N images of each class (a quick check)")
    p.add_argument("--force", action="store_true", help="start over in an --output that holds an earlier demo")
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="convnext", description="ConvNeXt V1/V2 models, weights and training.")
    parser.add_argument("--version", action="version", version=f"convnext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list_info_convert(sub)
    _add_train_eval_predict(sub)
    _add_dense(sub)
    _add_pretrain(sub)
    _add_export_bench_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        code = func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"convnext {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a non-finite loss under --nan-policy abort, a lost node: the run failed
        from .train.engine import NonFiniteLossError, PeerLostError

        if args.debug or not isinstance(e, (NonFiniteLossError, PeerLostError)):
            raise
        print(f"convnext {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
