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


def _cmd_train(spec, args: argparse.Namespace) -> None:
    from .train import fit
    from .train.config import from_args

    cfg = from_args(args, spec.config)  # validate here, before any process is launched
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        _launch_torchrun(args)
        return
    summary = fit(spec.task(cfg))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one summary, rank 0's
        print(spec.summarize(summary))


def _cmd_eval(spec, args: argparse.Namespace) -> None:
    from .tasks import pick

    kwargs = {"batch_size": args.batch_size, "workers": args.workers, "precision": args.precision,
              "progress": not args.json} | pick(spec.eval_options, vars(args))
    checkpoint = kwargs.pop("checkpoint", args.checkpoint)
    res = spec.evaluate(checkpoint, args.data, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: one report, rank 0's
        print(spec.format_results(res, "json" if args.json else "text"))


def _cmd_predict(spec, args: argparse.Namespace) -> int:
    from .eval.predict import predict_images
    from .tasks import pick

    options = pick(spec.predict_options, vars(args))
    results = predict_images(spec.predictor, args.checkpoint, args.images, **options)
    style = next((s for s in spec.predict_styles[1:] if getattr(args, s, False)), "text")
    print(spec.format_predictions(results, style))
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"{args.prog}: cannot read {r['path']} ({r['error']})", file=sys.stderr)
    if options.get("output"):
        print(f"wrote {options['output']}", file=sys.stderr)
    return 1 if failed else 0  # as cp and grep: scripts notice that some inputs failed


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


def _cmd_bench(args: argparse.Namespace) -> None:

    from .bench import BenchOptions, format_table, run
    from .utils import check_output

    if args.json and args.json != "-":
        check_output(args.json, force=args.force, suffixes=(".json",))
    if args.mode == "data" or args.data:
        return _bench_data(args)
    if args.mode == "contention":
        from .bench.contention import bench_contention, format_contention_table

        res = bench_contention(args.model, args.batch_size, args.input_size, steps=args.batches, repeats=args.repeats,
                               progress=args.json != "-")
        return _report_bench(args, res, format_contention_table)
    res = run(BenchOptions(
        model=args.model, batch_size=args.batch_size, input_size=args.input_size, mode=args.mode,
        precision=args.precision, compare=tuple(p for p in args.compare.split(",") if p), repeats=args.repeats,
        warmup=args.warmup, device=args.device, threads=args.threads, compile=args.compile,
        optimize=args.optimize, memory=not args.no_memory, progress=args.json != "-"))
    _report_bench(args, res, format_table)


def _report_bench(args: argparse.Namespace, res: dict, table: Callable[[dict], str]) -> None:
    """A benchmark's result: the command that made it, its table (unless --json -), and --json (file or stdout)."""
    import json

    from .utils import atomic_write

    res["command"] = "convnext " + " ".join(args.argv if args.argv is not None else sys.argv[1:])
    if args.json != "-":
        print(table(res))
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            atomic_write(args.json, lambda tmp: Path(tmp).write_text(text + "\n"))


def _bench_data(args: argparse.Namespace) -> None:
    from .bench.data import bench_data, format_data_table

    if args.mode != "data" or not args.data:
        raise ValueError("--mode data and --data SRC[,SRC...] go together (the input pipeline alone)")
    try:
        workers = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        raise ValueError(f"--workers must be N or N,N,... loader processes, got {args.workers!r}") from None
    res = bench_data([s for s in args.data.split(",") if s], workers, batch_size=args.batch_size,
                     decodes=tuple(d for d in args.decode.split(",") if d),
                     input_size=args.input_size, batches=args.batches, repeats=args.repeats, threads=args.threads,
                     progress=args.json != "-")
    _report_bench(args, res, format_data_table)


def _cmd_push(args: argparse.Namespace) -> None:
    from .weights.hub import push

    url = push(args.folder, args.repo, private=args.private, revision=args.revision, message=args.message)
    print(f"pushed {args.folder} to {args.repo}: {url}")


def _cmd_export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    if args.format in ("hub", "transformers"):
        from .export import export_hub_folder

        path, info = export_hub_folder(args.checkpoint, args.format, args.output, key=args.key,
                                       input_size=args.input_size, license=args.license, force=args.force)
        loads = ("timm.create_model('local-dir:DIR', pretrained=True)" if args.format == "hub" else
                 "AutoModelForImageClassification.from_pretrained(DIR)")
        print(f"wrote {path}: {info.model_name} ({len(info.classes)} classes) in {args.format} layout with its model "
              f"card; {loads} loads it, `convnext push {path} ORG/NAME` shares it")
        return
    if args.license:
        raise ValueError("--license is for --format hub|transformers (a model card)")
    path, info = export_checkpoint(args.checkpoint, args.format, args.output, key=args.key,
                                   input_size=args.input_size, dynamic_size=not args.static_size, force=args.force)
    pre = info.preprocess
    size = "dynamic batch and image size" if not args.static_size and args.format != "torchscript" else "dynamic batch"
    print(f"exported {info.model_name} ({len(info.classes)} classes) as {args.format} to {path} ({size}; "
          f"preprocessing: {pre.input_size}px, crop {pre.crop_pct}, mean/std embedded)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .tasks import demo_task

    spec = demo_task(args.task)
    mine = {o.dest for o in spec.demo_options}
    given = [d for d in args.demo_dests if getattr(args, d) not in (None, False)]
    stray = [d for d in given if d not in mine]
    if stray:
        raise ValueError(f"{', '.join('--' + d.replace('_', '-') for d in stray)} not for --task {args.task}"
                         + (f" (its options: {', '.join(f.flags[0] for f in spec.demo_options)})"
                            if spec.demo_options else ""))
    spec.demo(output=args.output, epochs=args.epochs, force=args.force, **{d: getattr(args, d) for d in mine})


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
    p.add_argument("dst", help="output: .safetensors (any layout, our header in its metadata) or .pth/.pt as the "
                               "layout's owners save it (official: {'model': ...}; timm: {'state_dict': ...}; "
                               "torchvision: the state dict); --to hf: a transformers folder")
    p.add_argument("--model", help="architecture name (inferred from the weights when omitted)")
    p.add_argument("--key", help="state dict key inside the file, e.g. model_ema")
    p.add_argument("--to", default="ours", choices=["ours", *TABLES, "fcmae", "official-seg", "official-det"],
                   help="layout to write (default: ours); fcmae: a whole pre-training model (convnext pretrain's "
                        "last.pt) in the official FCMAE layout, as a .pt file the official code loads; official-seg: "
                        "an UperNet segmenter in the official mmseg layout (.pth as mmcv saves it, or .safetensors); "
                        "official-det: a (Cascade) Mask R-CNN in the official mmdet layout")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_convert)


def _add_task(sub, spec, top_level: bool = False) -> None:
    """`convnext NAME train|eval|predict` from the task's spec (classification's also as top-level commands)."""
    from functools import partial

    from .train.config import add_arguments

    if top_level:
        actions, prefix = sub, ""
    else:
        top = sub.add_parser(spec.name, help=spec.help)
        actions, prefix = top.add_subparsers(dest="action", required=True, metavar="ACTION"), f"{spec.name} "
    p = actions.add_parser("train", help=f"train: {spec.help}")
    add_arguments(p, spec.config)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: launches torchrun --standalone for you (default: 1)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc: restarts after a failure, each resuming from the last checkpoint")
    p.set_defaults(func=partial(_cmd_train, spec), prog=f"convnext {prefix}train")

    if spec.evaluate is not None:
        _add_eval(actions, spec, prefix)
    if spec.predictor is not None:
        _add_predict(actions, spec, prefix)


def _add_eval(actions, spec, prefix: str) -> None:
    from functools import partial

    p = actions.add_parser("eval", help=f"evaluate a {spec.name} checkpoint")
    own = {f for o in spec.eval_options for f in o.flags}  # a task's own option replaces the common one
    common = [("--checkpoint", dict(required=True, help="best.safetensors, last.pt or any supported checkpoint")),
              ("--data", dict(required=True, help="the data to evaluate on")),
              ("--batch-size", dict(type=int, default=spec.eval_batch_size)),
              ("--workers", dict(type=int, default=0)),
              ("--precision", dict(choices=["fp32", "bf16"], default="fp32")),
              ("--json", dict(action="store_true", help="print the results as JSON"))]
    for flag, kwargs in common:
        if flag not in own:
            p.add_argument(flag, **kwargs)
    for o in spec.eval_options:
        o.add_to(p)
    p.set_defaults(func=partial(_cmd_eval, spec), prog=f"convnext {prefix}eval")


def _add_predict(actions, spec, prefix: str) -> None:
    from functools import partial

    p = actions.add_parser("predict", help=f"predict images with a {spec.name} checkpoint")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    styles = p.add_mutually_exclusive_group()
    for style in spec.predict_styles[1:]:
        styles.add_argument(f"--{style}", action="store_true", help=f"print the results as {style.upper()}")
    for o in spec.predict_options:
        o.add_to(p)
    p.set_defaults(func=partial(_cmd_predict, spec), prog=f"convnext {prefix}predict")


def _cmd_data(args: argparse.Namespace) -> int:
    import json

    from .data.pack import describe, format_info, pack

    if args.data_command == "info":
        info = describe(args.src)
        print(json.dumps(info, indent=1) if args.json else format_info(info))
        return 0
    manifest = pack(args.src, args.out, fmt=args.format, labels=args.labels, split=args.split,
                    shard_size=args.shard_size, resize_short=args.resize_short, quality=args.quality,
                    workers=args.workers, name=args.name, force=args.force, progress=not args.no_progress)
    counts = ", ".join(f"{s} {v['num_samples']}" for s, v in manifest["splits"].items())
    print(f"wrote {args.out} ({args.format}: {counts} images, {len(manifest['classes'])} classes)")
    if manifest["skipped"]:
        print(f"convnext data pack: skipped {len(manifest['skipped'])} unreadable images: {manifest['skipped'][0]}"
              + (", ..." if len(manifest["skipped"]) > 1 else ""), file=sys.stderr)
        return 1  # a partial pack: said, and the exit status says it too
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="pack an image folder into WebDataset shards or a Hugging Face dataset; info")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("pack", help="an image folder (split folders of class folders, or --labels) -> wds / hf")
    q.add_argument("src", help="folder: train/ val|validation/ test/ of <class>/ folders, one folder of <class>/ "
                               "folders, or a flat folder with --labels")
    q.add_argument("out", help="the folder to write (never an existing one without --force)")
    q.add_argument("--format", choices=["wds", "hf"], default="wds", help="WebDataset tar shards or save_to_disk")
    q.add_argument("--labels", help="CSV (filename|path,label) or JSONL of the images of a flat SRC")
    q.add_argument("--split", default="train", help="the split name of a SRC without split folders (train)")
    q.add_argument("--shard-size", default="1GB", help="largest shard (wds) or arrow file (hf): 1GB, 500MB, ...")
    q.add_argument("--resize-short", type=int, help="re-encode as JPEG with the shorter side at most this")
    q.add_argument("--quality", type=int, default=95, help="JPEG quality with --resize-short (95)")
    q.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes reading and encoding images")
    q.add_argument("--name", help="the shards' name prefix (default: SRC's folder name)")
    q.add_argument("--force", action="store_true", help="replace an existing OUT")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q = dsub.add_parser("info", help="what a data source holds: a folder, hf:PATH_OR_NAME, wds:DIR")
    q.add_argument("src")
    q.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_data)


def _add_export_bench_demo(sub) -> None:
    from .bench import MODES, OPTIMIZE, PEERS
    from .export import FORMATS
    from .utils import PRECISIONS

    p = sub.add_parser("export", help="export a checkpoint for deployment (ONNX, TorchScript, torch.export, "
                                      "OpenVINO) or sharing (a Hub folder in timm's or transformers' layout)")
    p.add_argument("--checkpoint", required=True, help="best.safetensors, last.pt or any supported checkpoint")
    p.add_argument("--format", required=True, choices=[*FORMATS, "hub", "transformers"],
                   help="hub: timm's Hub layout (timm.create_model('local-dir:DIR') / hf-hub:); transformers: "
                        "AutoModelForImageClassification.from_pretrained(DIR)")
    p.add_argument("--output", help="output file, or folder for hub/transformers (default: beside the checkpoint, "
                                    "its name with .onnx/.pt/.pt2 or -hub/-transformers; never the checkpoint itself)")
    p.add_argument("--license", help="hub/transformers: the weights' licence in the model card (default: that of "
                                     "the published weights the run started from, else other)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", help="state dict key, e.g. model_ema")
    p.add_argument("--input-size", type=int, help="preprocessing input size to record (default: the checkpoint's)")
    p.add_argument("--static-size", action="store_true", help="fix the image size (batch stays dynamic)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("push", help="upload a folder from `convnext export --format hub|transformers` to the Hub")
    p.add_argument("folder", help="the exported model folder")
    p.add_argument("repo", help="ORG/NAME of the model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("bench", help=f"speed against {', '.join(PEERS)}, measured side by side")
    p.add_argument("--model", default="convnext_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--mode", choices=[*MODES, "data", "contention"], default="infer",
                   help="infer, train (a training step), data: the input pipeline alone (with --data), contention: "
                        "the training step quiet and with a busy process beside it (e.g. --model convnext_atto "
                        "--batch-size 128 --input-size 32 --batches 8 --repeats 3: the demo's)")
    p.add_argument("--data", help="--mode data: sources to time, comma-separated (a folder, hf:..., wds:...)")
    p.add_argument("--workers", default="0", help="--mode data: loader processes, N or N,N,... (default 0)")
    p.add_argument("--batches", type=int, default=10, help="--mode data: batches timed per round")
    p.add_argument("--decode", default="cpu", help="--mode data: cpu, cpu-draft, gpu, or several comma-separated")
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
                   help="ours through optimize_for_inference (--mode train: optimize_for_training): compile (times "
                        "eager and compiled, keeps the faster; default), eager (no compiling; inference only), off")
    p.add_argument("--no-memory", action="store_true", help="skip the per-candidate peak-memory runs")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH ('-': only JSON, to stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(func=_cmd_bench)

    _add_demo(sub)


def _add_demo(sub) -> None:
    from .tasks import demo_names, demo_task

    names = demo_names()
    p = sub.add_parser("demo", help="the main job: train on embedded Fashion-MNIST, evaluate, predict")
    p.add_argument("--task", choices=names, default="classify",
                   help="classify (default), detect / segment on generated scenes of garments on photographs, or "
                        "fcmae: FCMAE pre-training, then fine-tuning on 10%% of the labels vs from scratch")
    p.add_argument("--output", help="default: runs/demo (classify), runs/demo-<task> for the others")
    p.add_argument("--epochs", type=int, help="override the demo recipe's epochs (fcmae: of the labelled runs)")
    p.add_argument("--force", action="store_true", help="start over in an --output that holds an earlier demo")
    dests: list[str] = []
    for name in names:
        for o in demo_task(name).demo_options:
            if o.dest not in dests:
                dests.append(o.dest)
                o.add_to(p.add_argument_group(f"--task {name}"))
    p.set_defaults(func=_cmd_demo, demo_dests=dests)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .tasks import get_task, list_tasks

    parser = OneLineParser(prog="convnext", description="ConvNeXt V1/V2 models, weights and training.")
    parser.add_argument("--version", action="version", version=f"convnext {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list_info_convert(sub)
    for name in list_tasks():
        spec = get_task(name)
        if spec.top_level:
            _add_task(sub, spec, top_level=True)
        _add_task(sub, spec)
    _add_export_bench_demo(sub)
    _add_data(sub)
    return parser


def _with_default_action(argv: list[str]) -> list[str]:
    """`convnext pretrain --data ...` = `convnext pretrain train --data ...` (a task's `default_action`)."""
    from .tasks import get_task

    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), None)  # the command
    if i is None:
        return argv
    try:
        action = get_task(argv[i]).default_action
    except ValueError:  # not a task's command
        return argv
    rest = argv[i + 1:]
    if action and not (rest and rest[0] in ("train", "eval", "predict", "-h", "--help")):
        return [*argv[:i + 1], action, *rest]
    return argv


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (and exit code 2) like every other error here."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` shows the usage)\n")


def _environment_error(e: OSError) -> str:
    """An OSError of the machine (disk full, read-only, I/O), as one line."""
    import errno

    where = f" writing {e.filename}" if e.filename else ""
    words = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large", errno.EROFS:
             "read-only file system", errno.EDQUOT: "disk quota exceeded", errno.EIO: "input/output error"}
    return words.get(e.errno, (e.strerror or str(e) or type(e).__name__).lower()) + where


def _on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds: temporary files are removed, the output's lock is released


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(_with_default_action(list(sys.argv[1:] if argv is None else argv)))
    args.argv = None if argv is None else list(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading_main() else None
    try:
        return _run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int | None] = args.func
    prog = getattr(args, "prog", f"convnext {args.command}")
    try:
        code = func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's: a full or read-only disk, an I/O error
        if args.debug:
            raise
        print(f"{prog}: error: {_environment_error(e)}", file=sys.stderr)
        return 1
    except FloatingPointError as e:  # a model whose outputs are NaN/inf: nothing it computed can be used
        if args.debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a non-finite loss, a lost node, an epoch of unreadable data: the run failed
        from .train.engine import NonFiniteLossError, PeerLostError, TooManyBadSamplesError

        if args.debug or not isinstance(e, (NonFiniteLossError, PeerLostError, TooManyBadSamplesError)):
            raise
        print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
