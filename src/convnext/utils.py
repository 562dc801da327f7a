"""Small helpers every part may import: atomic file writes, autocast by precision name, CPU facts, and the
reductions across processes that exact metrics need (no-ops outside a process group)."""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def temp_file(folder: str | os.PathLike, prefix: str, suffix: str) -> str:
    """A new empty file in `folder` with the permissions a plain open() would give (umask honoured).

    `tempfile.mkstemp` creates files 0600, so a colleague or a serving process in the same group
    could not read what we write; this makes them 0644 under the usual umask 022.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    os.chmod(tmp, file_mode())
    return tmp


def file_mode() -> int:
    """The mode a plain open() gives a new file here (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> None:
    """Call `write(tmp_path)`, fsync, then rename over `path`: readers never see a partial file.

    `suffix` is the temporary file's (some writers infer the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # again: some writers (safetensors) recreate the file 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, OSError) and _disk_full(e, path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    if hasattr(os, "O_DIRECTORY"):  # persist the rename itself
        dfd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _disk_full(e: Exception, folder: Path) -> bool:
    """Whether a writer's own error (torch.save: "unexpected pos"; safetensors: an I/O error) was a full disk."""
    import shutil

    text = str(e)
    if any(s in text for s in ("No space left", "unexpected pos", "file write failed", "File too large")):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """`a` and `b` are one file (the same path, or the same inode: a hard link), both existing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """`path` is `folder` or lies below it (symlinks resolved)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def check_output(path: str | os.PathLike, *, inputs: tuple[str | os.PathLike, ...] = (), force: bool = False,
                 suffixes: tuple[str, ...] = ()) -> Path:
    """`path` if a command may write it: never one of its own inputs, an existing file only with
    --force, and a suffix that says what the file is. Raises ValueError (one line) otherwise."""
    path = Path(path)
    for src in inputs:
        if Path(src).exists() and (path.resolve() == Path(src).resolve()
                                   or (path.exists() and os.path.samefile(path, src))):
            raise ValueError(f"the output {path} is the input {src}: choose another output")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ValueError(f"the output {path} should end in {' or '.join(suffixes)} (the format written)")
    if path.is_dir():
        raise ValueError(f"the output {path} is a folder; name a file")
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it, or choose another output")
    return path


def cache_dir() -> Path:
    """Where downloads go: $CONVNEXT_CACHE, else <torch hub dir>/convnext."""
    env = os.environ.get("CONVNEXT_CACHE")
    path = Path(env) if env else Path(torch.hub.get_dir()) / "convnext"
    if path.exists() and not path.is_dir():
        raise ValueError(f"the download cache {path} ({'$CONVNEXT_CACHE' if env else 'torch hub'}) is a file; "
                         f"point CONVNEXT_CACHE at a folder")
    return path


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict | None:
    """The JSON object in `path`, None if there is no such file; `error` (one line naming the file) for a file
    that is not readable JSON or holds something else than an object."""
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    return data


def seeded(fn: Callable, seed: int, *args: object) -> object:
    """`fn(*args)` with the CPU generator the transforms draw from seeded, then restored.

    Only the CPU generator: torch.manual_seed would also seed every accelerator (~300 us per sample).
    """
    gen = torch.random.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        return fn(*args)
    finally:
        gen.set_state(state)


def autocast(device: torch.device | str, precision: str):
    """torch.autocast to bf16/fp16 on `device`, a no-op context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _cpuinfo_field(name: str) -> str | None:
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith(name))
    return None


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def machine_line() -> str:
    """"on N CPU cores (CPU name), torch X": how results name the machine they were measured on."""
    return f"on {os.cpu_count()} CPU cores ({cpu_name()}), torch {torch.__version__}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return set((_cpuinfo_field("flags") or "").split())


def native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU has bf16/fp16 matrix instructions (oneDNN's fast low-precision GEMMs)."""
    flags = cpu_flags()
    if dtype == torch.bfloat16:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(flags & {"amx_fp16", "avx512_fp16"})


def cpu_class() -> str:
    """"amx" (AMX-BF16: Sapphire Rapids and later), "avx512" (AVX-512 with avx512_bf16: Zen 4/5), "avx2", or
    "other": from what torch itself dispatches to (`get_cpu_capability`) and the bf16 instructions the CPU has.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and "amx_bf16" in cpu_flags():
        return "amx"
    if capability.startswith("AVX512") and "avx512_bf16" in cpu_flags():
        return "avx512"
    return "avx2" if capability.startswith(("AVX2", "AVX512")) else "other"


def pick_device(preference: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """auto (CUDA when torch sees one), cpu, cuda (cuda:LOCAL_RANK under torchrun) or cuda:N (one process)."""
    kind, _, index = str(preference).partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {preference!r}")
    if index and world_size > 1:
        raise ValueError(f"--device {preference}: under torchrun each process takes cuda:LOCAL_RANK; use --device cuda")
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {preference} was asked for, but torch sees no CUDA device")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise ValueError(f"--device {preference}: this machine has {n} CUDA device(s), cuda:0 .. cuda:{n - 1}")
        return torch.device("cuda", int(index) if index else local_rank)
    return torch.device("cpu")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def process_rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if _distributed() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every process, in place (the tensor must be on the process group's device)."""
    if _distributed():
        torch.distributed.all_reduce(t)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def all_gather_list(items: list) -> list:
    """Every process's `items`, concatenated in rank order (picklable items)."""
    if not _distributed():
        return items
    out: list[list] = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]
