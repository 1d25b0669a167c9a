"""Timing, memory and reporting helpers shared by the benchmarks.

Every benchmark measures our implementation and its baseline in the same run with the
same settings, and reports each measurement as one JSON line (stdout, prefixed
`BENCH_JSON `, and appended to `<out-dir>/<bench>.jsonl`) plus markdown tables written
to `<out-dir>/<bench>.md`.

Method (see /work/.library/device/METHOD.md): warm-up steps first (kernel selection,
allocator growth, lazy init stay out of the numbers), the device synchronised before
every clock read, the median of the measured steps reported, peak device memory from
`torch.cuda.max_memory_allocated` after a reset (what the tensors needed, not what the
caching allocator reserved). On CPU there is no device peak; the process's peak RSS is
reported instead, which only ever grows over a process and so is an upper bound for
variants run later in the same process.

Variants run in one process by default, baselines first: in a process where megatron's
parallel state was initialised, transformers builds wrong RoPE buffers (a known pitfall of
this repository), so no Hugging Face model may be built after `init_parallel`. `--isolate`
runs each variant in its own child process instead (clean peak memory, an OOM in one
variant cannot disturb the next), at the cost of one interpreter start per variant.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

JSON_PREFIX = "BENCH_JSON "
GIB = 2**30


# ---- arguments -----------------------------------------------------------------------------

def base_parser(description: str, *, default_shape: str, variants: tuple[str, ...]) -> argparse.ArgumentParser:
    """The options every benchmark takes; each script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--shape", default=default_shape,
                        help="Qwen3 shape(s) from bench/model_shapes.py, comma-separated (tiny, 0.6b, 1.7b, 8b)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before measuring")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (the median is reported)")
    parser.add_argument("--variants", default=",".join(variants),
                        help=f"comma-separated subset of: {', '.join(variants)}")
    parser.add_argument("--out-dir", default="runs/bench", help="where <bench>.jsonl and <bench>.md go")
    parser.add_argument("--isolate", action="store_true",
                        help="run each variant in its own child process (clean peak memory per variant)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser


def parse_variants(text: str, allowed: tuple[str, ...]) -> list[str]:
    """Requested variants in the benchmark's canonical order (baselines first)."""
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in allowed]
    if unknown or not wanted:
        raise ValueError(f"--variants {text!r}: unknown {unknown}; allowed: {', '.join(allowed)}")
    return [v for v in allowed if v in wanted]


def fill_defaults(args, *, full: dict, smoke: dict) -> None:
    """Options left unset take the full-size default, or the smoke-test default when every
    requested shape is "tiny" (so `--shape tiny --device cpu` alone runs in seconds)."""
    only_tiny = all(s.strip() == "tiny" for s in args.shape.split(",") if s.strip())
    args.filled_defaults = []  # passed on to --isolate children, whose own shape list may differ
    for key, value in (smoke if only_tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            args.filled_defaults += ["--" + key.replace("_", "-"), str(value)]
    check_counts(args)


def check_counts(args) -> None:
    if args.warmup < 0 or args.steps < 1:
        raise ValueError(f"--warmup {args.warmup} --steps {args.steps}; allowed: warmup >= 0, steps >= 1")


def resolve_device(name: str) -> torch.device:
    """The torch device for --device; refuses cuda on a machine without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False; use --device cpu or auto")
    return torch.device(name)


# ---- timing and memory ---------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> float:
    """Free what the previous variant left, reset the peak counter; returns GiB still allocated."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak bytes allocated by tensors since the last `release_memory` (None on CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / GIB


def peak_reserved_gib(device: torch.device) -> float | None:
    """Peak bytes the caching allocator held since the last `release_memory` (None on CPU):
    the allocated peak plus fragmentation, what the memory planner's headroom item models."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_reserved(device) / GIB


def host_peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn: Callable, device: torch.device):
    """(result, seconds) of fn() with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def time_steps(step_fn: Callable[[], object], *, warmup: int, steps: int, device: torch.device) -> dict:
    """Run `warmup` untimed then `steps` timed calls; returns the step times and the last result."""
    for _ in range(warmup):
        step_fn()
    times, last = [], None
    for _ in range(steps):
        last, seconds = timed(step_fn, device)
        times.append(seconds)
    return {"step_times_s": times, "last": last}


def timing_summary(times: list[float]) -> dict:
    return {"step_time_median_s": statistics.median(times), "step_time_min_s": min(times),
            "step_time_max_s": max(times), "num_measured_steps": len(times)}


def ratio(numerator, denominator) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ---- environment ---------------------------------------------------------------------------

def _version(module_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module_name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10,
                               cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """What a reader needs to reproduce a number: device, date, software versions."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "device": device.type,
        "device_name": device_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "trl": _version("trl"),
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
        "git_commit": _git_commit(),
    }


def free_port() -> int:
    """An unused TCP port for torch.distributed's rendezvous (other jobs may hold 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_megatron(seed: int) -> None:
    """Single-process megatron parallel state (tp=pp=1) on a free port."""
    from gazal_nemo.parallel import init_parallel

    if not torch.distributed.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
    init_parallel(tp=1, pp=1, seed=seed)


# ---- output --------------------------------------------------------------------------------

class Reporter:
    """Collects measurement records; prints and appends each one as a JSON line."""

    def __init__(self, bench: str, out_dir: str | os.PathLike, device: torch.device):
        self.bench = bench
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / f"{bench}.jsonl"
        self.env = environment(device)
        self.records: list[dict] = []

    def emit(self, record: dict) -> dict:
        record = {"bench": self.bench, **self.env, **record}
        line = json.dumps(record, sort_keys=False, default=str)
        print(JSON_PREFIX + line, flush=True)
        with open(self.jsonl, "a") as handle:  # one write per line: a torn last line fails to parse
            handle.write(line + "\n")
        self.records.append(record)
        return record

    def adopt(self, record: dict) -> None:
        """A record a child process already emitted and wrote."""
        self.records.append(record)

    def write_markdown(self, text: str) -> Path:
        path = self.out_dir / f"{self.bench}.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def comparison_row(env: dict, settings: str, ours: dict | None, baseline: dict | None, *, metric: str,
                   unit: str, higher_is_better: bool = True) -> list:
    """One PERFORMANCE.md row: device, date, settings, ours, baseline, ratio (ours/baseline)."""
    a = ours.get(metric) if ours and ours.get("status") == "ok" else None
    b = baseline.get(metric) if baseline and baseline.get("status") == "ok" else None
    label = "ours/baseline" if higher_is_better else "ours/baseline (lower is better)"
    ratio_text = f"{ratio(a, b):.2f}x ({label})" if a is not None and b else "n/a"
    smoke = " (CPU smoke test, not a performance claim)" if env.get("device") == "cpu" else ""
    return [env.get("device_name", "?") + smoke, env.get("date_utc", "?"), settings,
            f"{_cell(a)} {unit}" if a is not None else _failed_text(ours),
            f"{_cell(b)} {unit}" if b is not None else _failed_text(baseline), ratio_text]


def speed_and_memory_rows(env: dict, settings: str, ours: dict | None, baseline: dict | None) -> list[list]:
    """The tokens/s row, and on a GPU the peak-memory row, of one comparison."""
    rows = [comparison_row(env, settings + " [tokens/s]", ours, baseline, metric="tokens_per_s", unit="tok/s")]
    if env.get("device") == "cuda":
        rows.append(comparison_row(env, settings + " [peak memory]", ours, baseline, metric="peak_mem_gib",
                                   unit="GiB", higher_is_better=False))
    return rows


def _failed_text(record: dict | None) -> str:
    if record is None:
        return "not run"
    if record.get("status") == "ok":
        return "n/a (not measured on this device)"
    return f"{record.get('status', '?')}: {str(record.get('error', ''))[:80]}"


PERFORMANCE_HEADER = ["device", "date (UTC)", "settings", "ours", "baseline", "ratio"]


# ---- running variants ----------------------------------------------------------------------

def run_variants(reporter: Reporter, jobs: list[tuple[dict, Callable[[], dict]]], *, args,
                 device: torch.device) -> list[dict]:
    """Run each (identity, measure) job and emit its record; a failure becomes a 'failed' record.

    `identity` (variant, shape, ...) goes into the record whatever happens; `measure()`
    returns the measured fields. With `args.isolate`, each job reruns this script in a
    child process restricted to that job (`--variants V --shape S`, defaults as resolved here).
    """
    out = []
    for identity, measure in jobs:
        if args.isolate:
            out.append(_run_child(reporter, identity, args.filled_defaults))
            continue
        resident = release_memory(device)
        try:
            fields = measure()
            record = {**identity, "status": "ok", "resident_before_gib": resident,
                      "peak_reserved_gib": peak_reserved_gib(device), "host_peak_rss_gib": host_peak_rss_gib(),
                      **fields}
        except Exception as error:  # noqa: BLE001 - an OOM in one variant must not hide the others
            traceback.print_exc()
            record = {**identity, "status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]}
        out.append(reporter.emit(record))
        release_memory(device)
    return out


def _run_child(reporter: Reporter, identity: dict, filled_defaults: list[str]) -> dict:
    argv = _child_argv(sys.argv[1:], variant=identity["variant"], shape=identity["shape"]) + filled_defaults
    cmd = [sys.executable, "-u", sys.argv[0], *argv]
    print("+ " + " ".join(cmd), flush=True)
    found = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    tail: list[str] = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        tail = (tail + [line.rstrip()])[-20:]
        if line.startswith(JSON_PREFIX):
            found.append(json.loads(line[len(JSON_PREFIX):]))
    returncode = proc.wait()
    mine = [r for r in found if r.get("variant") == identity["variant"]]
    if mine:
        reporter.adopt(mine[-1])
        return mine[-1]
    error = f"child exited {returncode} without a record; last output: " + " / ".join(tail[-5:])
    return reporter.emit({**identity, "status": "failed", "error": error[:2000]})


def _child_argv(argv: list[str], *, variant: str, shape: str) -> list[str]:
    """This run's arguments, restricted to one variant and shape, without --isolate."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--isolate":
            continue
        if name in ("--variants", "--shape"):
            skip = "=" not in arg and i + 1 < len(argv)
            continue
        out.append(arg)
    return out + ["--variants", variant, "--shape", shape]


def find(records: list[dict], **match) -> dict | None:
    """The last record whose fields equal `match`."""
    hits = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def add_repo_to_path() -> None:
    """Let `python bench/x.py` import `bench.*` and `gazal_nemo` from the repository root."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
