"""`convnext` command line: parse, then call one library function per command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger("convnext")


def _cmd_list(args: argparse.Namespace) -> None:
    import torch

    from .factory import create_model, list_models
    from .models.flops import count_macs, count_params
    from .weights import PRETRAINED

    names = list_models(args.pattern if any(c in args.pattern for c in "*?[") else f"*{args.pattern}*")
    if not names:
        raise ValueError(f"no model matches {args.pattern!r} (`convnext list` shows all)")
    print(f"{'model':<26} {'params (M)':>10} {'GMACs@224':>9}  weights")
    for name in names:
        with torch.device("meta"):  # shapes only: counts without allocating weights
            model = create_model(name)
            params, macs = count_params(model), count_macs(model, 224)
        tags = [t.split(".", 1)[1] for t in PRETRAINED if t.split(".", 1)[0] == name]
        print(f"{name:<26} {params / 1e6:>10.2f} {macs / 1e9:>9.2f}  {', '.join(tags) or '-'}")


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
    print(f"{name}: {type(model).__name__}, {params:,} parameters, {macs / 1e9:.2f} GMACs at 224x224")
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
    from .factory import _match_arch, check_model_name, create_model
    from .weights import infer_config, read_checkpoint, save_checkpoint, to_ours, unwrap

    obj, _ = read_checkpoint(args.src)
    state_dict = unwrap(obj, args.key)
    fmt, ours = to_ours(state_dict)
    if args.model:
        name = check_model_name(args.model)
    else:
        cls_name, cfg = infer_config(ours)
        name = _match_arch(cls_name, cfg)
        if name is None:
            raise ValueError(f"{args.src}: architecture {cfg} matches no registered model; pass --model NAME")
    model = create_model(name, pretrained=state_dict)
    save_checkpoint(model, args.dst, fmt=args.to)
    print(f"converted {fmt} checkpoint {args.src} -> {args.dst} ({name}, {args.to} layout)")


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
