"""Shared test helpers."""

import torch


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its init so parity tests exercise LayerScale, GRN, biases and norms."""
    g = torch.Generator().manual_seed(1234)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def sigkill_when(cmd: list, checkpoint, *, env=None, timeout: float = 300) -> None:
    """Start `cmd`, SIGKILL it as soon as `checkpoint` exists (a mid-run step file), and wait for it."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not checkpoint.exists():
        assert proc.poll() is None and time.time() - t0 < timeout, f"the run ended before {checkpoint} was written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def assert_same_run(a: dict, b: dict) -> None:
    """Two training checkpoints hold bitwise the same weights, optimizer state and metrics (timings aside)."""
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (i, sa), (j, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True):
        assert i == j and all(torch.equal(sa[k], sb[k]) for k in sa)

    def strip(history: list) -> list:
        return [{k: v for k, v in e.items() if k not in ("train_time_s", "train_img_s")} for e in history]

    assert strip(a["history"]) == strip(b["history"])


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`convnext ARGS` in this process (as fast as a library call): (exit code, stdout, stderr)."""
    from convnext.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    """The one non-empty line an error printed (anything else fails the test)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def run_cli(capsys, *args):
    """`python -m convnext ARGS` in this process, as a fresh process would answer: a CompletedProcess with the
    exit code (argparse's exits too: usage errors 2, --help 0), stdout and stderr, the log lines included
    (main()'s logging.basicConfig does nothing here: pytest's handlers are already on the root logger, so
    this puts one on it that writes to the captured stderr, at the level basicConfig would set)."""
    import logging
    import subprocess
    import sys

    from convnext.cli import main

    argv = [str(a) for a in args]
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # capsys's stream (the fixture is active)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    capsys.readouterr()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if "--debug" in argv else logging.INFO)
    try:
        code = main(argv)
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["convnext", *argv], code, out.out, out.err)
