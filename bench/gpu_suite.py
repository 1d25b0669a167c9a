"""The GPU suite: everything only a GPU can show, in one device call of at most 540 s.

Issue 10. A lent H200 gives a session 15 minutes of device time, machine start included,
so the measurements run from one prepared command (`bench/gpu_suite.sh`, which installs
the carried wheels and then runs this driver) in the issue's priority order:

  1 bf16 logits parity, 0.6B shape, ours vs transformers      bench_bf16_parity.py
  2 DoRA SFT speed, 8B shape: ours DoRA, ours LoRA, HF+PEFT     bench_dora_sft.py
  3 one GRPO step, 0.6B shape: ours vs TRL's first step         bench_grpo_step.py
  4 peak memory of SFT and GRPO steps vs the memory planner     bench_dora_sft / bench_grpo_step
    (1.7B here; 8B SFT and 0.6B GRPO come from items 2 and 3)  + bench_memory_plan.py
  5 full-parameter throughput, 1.7B shape, TFLOP/s and MFU      bench_train_throughput.py
  6 `gazal demo` end to end on the GPU                          bench_demo.py

Each step is a child process (its own process group, its own timeout) running an existing
bench script; every `BENCH_JSON` line it prints is tagged with the item and appended to
`<out>/suite.jsonl` the moment it appears, and the step's markdown goes to `<out>/suite.md`
when it ends, so a step or the whole call cut short still returns what finished. A step
starts only while the budget holds about its expected duration (bench/README.md says how
those were estimated); otherwise it is recorded as skipped. The summary table comes last,
on stdout (the device tool returns the output's tail) and in `<out>/summary.md`.

Output, four files in one folder (the device tool returns at most 8, 2 folders deep):
suite.jsonl (every record), suite.md (every step's tables), suite.log (all child output),
summary.md. The bench scripts' own files go to a scratch folder outside <out>.

`--mode rehearse` runs the same items on CPU with the tiny shape: every record is marked
`"rehearsal": true` and carries no performance claim; tests/bench runs it in CI.
This driver imports only the standard library, so it starts fast and holds no GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JSON_PREFIX = "BENCH_JSON "
GPU_BUDGET_S = 540  # the limit for the whole call, the wheel install included
REHEARSAL_BUDGET_S = 900  # CPU timings vary 10x under load; the CI test has its own timeout
SUMMARY_RESERVE_S = 10  # kept back for the summary after the last step
MEASURED_MATMUL_TFLOPS = 790  # H200 bf16 8192^3 matmul on random data (device KINDS.md, 2026-10/11)
REHEARSAL_CLAIM = "CPU rehearsal: shows the suite runs end to end; no performance claim"
ITEM_TITLES = {
    1: "bf16 logits parity, 0.6B shape, ours vs transformers",
    2: "DoRA SFT speed, 8B shape: ours DoRA / ours LoRA / HF+PEFT DoRA",
    3: "one GRPO step, 0.6B shape: ours vs TRL GRPOTrainer (first step)",
    4: "peak memory of SFT and GRPO steps vs the memory planner",
    5: "full-parameter training throughput, 1.7B shape, ours vs transformers",
    6: "gazal demo end to end",
}
VERSIONS_OF = ("torch", "transformers", "peft", "accelerate", "megatron-core", "trl", "datasets", "pyarrow",
               "fsspec", "dill", "multiprocess", "transformer-engine")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Step:
    """One child process of the suite."""

    item: int
    """The issue's item number (its priority)."""
    name: str
    """Short name of the step inside its item (folder name of its scratch output)."""
    argv: tuple[str, ...]
    """The bench script and its arguments, relative to the repository root."""
    estimate_s: float
    """Expected wall time on the H200 (bench/README.md); on CPU a rough guide only."""
    timeout_s: float
    """The child is stopped after this long (less when the budget has less left)."""
    fallback: Step | None = None
    """A shorter variant to run instead when this one no longer fits the budget."""

    @property
    def min_start_s(self) -> float:
        """Budget that must be left to start this step: most of its expected duration."""
        return max(15.0, 0.75 * self.estimate_s)


# ---- the items -----------------------------------------------------------------------------

def gpu_steps(records: Path) -> list[Step]:
    """The measurements on the H200, in the issue's priority order."""
    cuda = ("--device", "cuda")
    demo_short = Step(item=6, name="demo_short", argv=("bench/bench_demo.py", *cuda, "--sft-steps", "20",
                                                       "--grpo-steps", "5"), estimate_s=40, timeout_s=90)
    return [
        Step(item=1, name="parity", argv=("bench/bench_bf16_parity.py", "--shape", "0.6b", *cuda),
             estimate_s=35, timeout_s=90),
        Step(item=2, name="dora_8b", argv=("bench/bench_dora_sft.py", "--shape", "8b", "--variants",
                                           "hf-dora,ours-dora,ours-lora", "--isolate", "--warmup", "2",
                                           "--steps", "3", *cuda), estimate_s=110, timeout_s=200),
        # ours_vllm needs vLLM, which the device image lacks and the suite cannot carry (a ~400 MB wheel
        # with its own torch pin): the vLLM rows come from bench_rollout.py / bench_grpo_step.py by hand.
        Step(item=3, name="grpo_0.6b", argv=("bench/bench_grpo_step.py", "--shape", "0.6b", "--variants", "trl,ours",
                                            "--isolate", *cuda),
             estimate_s=90, timeout_s=160),
        Step(item=4, name="sft_1.7b", argv=("bench/bench_dora_sft.py", "--shape", "1.7b", "--variants", "ours-dora",
                                            "--warmup", "1", "--steps", "2", *cuda), estimate_s=30, timeout_s=70),
        Step(item=4, name="grpo_1.7b", argv=("bench/bench_grpo_step.py", "--shape", "1.7b", "--variants", "ours",
                                             *cuda), estimate_s=50, timeout_s=110),
        Step(item=4, name="vs_plan", argv=("bench/bench_memory_plan.py", "--records", str(records)),
             estimate_s=12, timeout_s=45),
        Step(item=5, name="throughput_1.7b", argv=("bench/bench_train_throughput.py", "--shape", "1.7b", "--isolate",
                                                   "--peak-tflops", str(MEASURED_MATMUL_TFLOPS), *cuda),
             estimate_s=55, timeout_s=110),
        Step(item=6, name="demo", argv=("bench/bench_demo.py", *cuda), estimate_s=90, timeout_s=160,
             fallback=demo_short),
    ]


def rehearsal_steps(records: Path) -> list[Step]:
    """The same steps on CPU with the tiny shape. Only item 5 keeps --isolate (each child
    costs an interpreter start, ~8 s here); it rehearses that path for all of them."""
    out = []
    for step in gpu_steps(records):
        out.append(dataclasses.replace(step, argv=_rehearsal_argv(step.argv, keep_isolate=step.item == 5),
                                       timeout_s=240, fallback=None))
    return out


def _rehearsal_argv(argv: tuple[str, ...], *, keep_isolate: bool) -> tuple[str, ...]:
    """Tiny shape, CPU, the scripts' smoke-test defaults (their --warmup/--steps dropped),
    and the demo with a handful of steps."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--shape", "--device", "--warmup", "--steps", "--sft-steps", "--grpo-steps"):
            skip = True
            continue
        if arg == "--isolate" and not keep_isolate:
            continue
        out.append(arg)
    if argv[0] == "bench/bench_demo.py":
        return (*out, "--device", "cpu", "--sft-steps", "4", "--grpo-steps", "2")
    if argv[0] == "bench/bench_memory_plan.py":
        return tuple(out)
    return (*out, "--shape", "tiny", "--device", "cpu")


# ---- output --------------------------------------------------------------------------------

class SuiteOutput:
    """The four files under <out>; every record is one appended line, written at once."""

    def __init__(self, out_dir: Path, *, rehearsal: bool):
        self.dir = out_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rehearsal = rehearsal
        self.jsonl, self.markdown, self.log = (self.dir / n for n in ("suite.jsonl", "suite.md", "suite.log"))
        self.records: list[dict] = []
        self._lock = threading.Lock()

    def add_record(self, record: dict, step: Step | None) -> dict:
        tags = {"suite_item": step.item if step else 0, "suite_step": step.name if step else "environment",
                "rehearsal": self.rehearsal}
        if self.rehearsal:
            tags["claim"] = REHEARSAL_CLAIM
        record = {**tags, **record}
        with self._lock, open(self.jsonl, "a") as handle:
            handle.write(json.dumps(record, default=str) + "\n")
        self.records.append(record)
        return record

    def add_log(self, line: str) -> None:
        with self._lock, open(self.log, "a") as handle:
            handle.write(line)

    def add_markdown(self, text: str) -> None:
        with self._lock, open(self.markdown, "a") as handle:
            handle.write(text.rstrip("\n") + "\n\n")

    def write_summary(self, text: str) -> Path:
        path = self.dir / "summary.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path


# ---- running one step ----------------------------------------------------------------------

def run_step(step: Step, *, timeout_s: float, python: str, scratch: Path, output: SuiteOutput) -> dict:
    """Run one step's child; returns the step's own record (its measurements are already written)."""
    step_dir = scratch / f"{step.item}-{step.name}"
    step_dir.mkdir(parents=True, exist_ok=True)
    argv = [python, "-u", *step.argv, "--out-dir", str(step_dir)]
    banner = f"\n===== item {step.item} {step.name}: {' '.join(argv)} (timeout {timeout_s:.0f} s)\n"
    print(banner, end="", flush=True)
    output.add_log(banner)
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = {"records": [], "tail": []}
    reader = threading.Thread(target=_read_child, args=(proc, step, output, seen), daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc)
    reader.join(timeout=10)
    wall = time.monotonic() - start
    _add_step_markdown(step, step_dir, output, wall)
    return output.add_record(_step_record(step, proc.returncode, wall, timeout_s, timed_out, seen), step)


def _read_child(proc, step: Step, output: SuiteOutput, seen: dict) -> None:
    """Echo and log the child's output; each BENCH_JSON line becomes a suite record at once."""
    for line in proc.stdout:
        print(line, end="", flush=True)
        output.add_log(line)
        seen["tail"] = (seen["tail"] + [line.rstrip()])[-8:]
        if line.startswith(JSON_PREFIX):
            try:
                record = json.loads(line[len(JSON_PREFIX):])
            except json.JSONDecodeError:
                continue
            seen["records"].append(output.add_record({"kind": "measurement", **record}, step))


def _stop_group(proc) -> None:
    """SIGTERM to the child's process group (its --isolate children too), SIGKILL after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _step_record(step: Step, returncode, wall: float, timeout_s: float, timed_out: bool, seen: dict) -> dict:
    records = seen["records"]
    failed = [r for r in records if r.get("status") == "failed"]
    if timed_out:
        status, error = "timeout", f"stopped after {timeout_s:.0f} s; {len(records)} record(s) finished before"
    elif returncode != 0 or not records or failed:
        status = "failed"
        error = (f"exit {returncode}; {len(records)} record(s), {len(failed)} failed; last output: "
                 + " / ".join(seen["tail"][-4:]))[:2000]
    else:
        status, error = "ok", None
    out = {"kind": "step", "bench": "gpu_suite", "status": status, "returncode": returncode, "wall_s": wall,
           "timeout_s": timeout_s, "estimate_s": step.estimate_s, "num_records": len(records),
           "command": " ".join(step.argv)}
    return out | ({"error": error} if error else {})


def _add_step_markdown(step: Step, step_dir: Path, output: SuiteOutput, wall: float) -> None:
    """The bench script's own markdown (its tables and PERFORMANCE.md rows) under a heading."""
    label = f" ({REHEARSAL_CLAIM})" if output.rehearsal else ""
    parts = [f"## Item {step.item}, {step.name}: {ITEM_TITLES[step.item]}{label}",
             f"`{' '.join(step.argv)}`, {wall:.0f} s"]
    parts += [_demote_headings(p.read_text()) for p in sorted(step_dir.glob("*.md"))]
    if len(parts) == 2:
        parts.append("(no markdown written: the step failed or was stopped; its records are in suite.jsonl)")
    output.add_markdown("\n\n".join(parts))


def _demote_headings(markdown: str) -> str:
    """A bench script's '## ' headings one level down, under the step's own heading."""
    return "\n".join("#" + line if line.startswith("## ") else line for line in markdown.splitlines())


# ---- the suite -----------------------------------------------------------------------------

def run_suite(steps: list[Step], *, budget_s: float, started_at: float, python: str,
              output: SuiteOutput) -> list[dict]:
    """Run the steps in order while the budget lasts; returns the step records."""
    results = []
    scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    try:
        for step in steps:
            left = budget_s - (time.time() - started_at) - SUMMARY_RESERVE_S
            chosen = step if left >= step.min_start_s else step.fallback
            if chosen is None or left < chosen.min_start_s:
                results.append(output.add_record(_skipped(step, left), step))
                print(f"\n===== item {step.item} {step.name}: skipped, {left:.0f} s of budget left", flush=True)
                continue
            results.append(run_step(chosen, timeout_s=min(chosen.timeout_s, left), python=python,
                                    scratch=scratch, output=output))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def _skipped(step: Step, left: float) -> dict:
    return {"kind": "step", "bench": "gpu_suite", "status": "skipped", "estimate_s": step.estimate_s,
            "command": " ".join(step.argv),
            "error": f"budget: {max(left, 0):.0f} s left, the step needs about {step.min_start_s:.0f} s to start"}


def environment_record(python: str) -> dict:
    """What the summary needs to say where it ran: GPU, driver, package versions, carry size."""
    gpu = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            gpu = query.stdout.strip() or query.stderr.strip()
        except (OSError, subprocess.SubprocessError) as error:
            gpu = f"nvidia-smi failed: {error}"
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    return {"kind": "environment", "bench": "gpu_suite", "status": "ok", "gpu": gpu,
            "python": platform.python_version(), "python_executable": python, "versions": _versions(),
            "wheels": [w.name for w in wheels], "wheels_mib": sum(w.stat().st_size for w in wheels) / 2**20,
            "pythonpath": os.environ.get("PYTHONPATH"),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def _versions() -> dict:
    out = {}
    for name in VERSIONS_OF:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- summary -------------------------------------------------------------------------------

def headline(r: dict) -> str:
    """One line of what a record says, for the summary table."""
    if r.get("status") != "ok":
        return f"{r.get('variant', r.get('suite_step'))}: {r.get('status')}: {str(r.get('error', ''))[:100]}"
    bench, variant = r.get("bench"), r.get("variant")
    if bench == "bf16_parity":
        return (f"ours rel err {_num(r.get('ours_rel_err'))} (HF bf16 {_num(r.get('hf_bf16_rel_err'))}, "
                f"tolerance {_num(r.get('tolerance'))}): {r.get('parity')}")
    if bench in ("dora_sft", "train_throughput"):
        text = f"{variant} {r.get('shape')}: {_num(r.get('tokens_per_s'))} tok/s, peak {_num(r.get('peak_mem_gib'))} GiB"
        if bench == "train_throughput":
            text += f", {_num(r.get('model_tflops_per_s'))} TFLOP/s, MFU {_num(r.get('mfu'))}"
        return text
    if bench == "grpo_step":
        return (f"{variant} {r.get('shape')}: step {_num(r.get('step_time_s'))} s, generation "
                f"{_num(r.get('gen_tokens_per_s'))} tok/s, peak {_num(r.get('peak_mem_gib'))} GiB")
    if bench == "memory_plan":
        return (f"{r.get('stage')} {r.get('shape')} ({r.get('measured_variant')}): allocated peak measured "
                f"{_num(r.get('measured_peak_gib'))} GiB, planned {_num(r.get('planned_allocated_gib'))} GiB "
                f"(planned total {_num(r.get('planned_total_gib'))} GiB) [planner {str(r.get('planner'))[:60]}]")
    if bench == "demo":
        return (f"{_num(r.get('wall_s'))} s, SFT loss {_num(r.get('sft_loss_first'))} -> "
                f"{_num(r.get('sft_loss_last'))}, GRPO accuracy {_num(r.get('grpo_accuracy_first5'))} -> "
                f"{_num(r.get('grpo_accuracy_last10'))}, learned: {r.get('learned')}")
    if r.get("kind") == "step":
        return f"{r.get('num_records', 0)} record(s)"
    return str(variant or bench)


def _num(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def summary(output: SuiteOutput, *, budget_s: float, started_at: float) -> str:
    """The closing table: every step with its status and time, every measurement's headline."""
    env = next((r for r in output.records if r.get("kind") == "environment"), {})
    title = "GPU suite summary" + (f" -- {REHEARSAL_CLAIM}" if output.rehearsal else "")
    lines = [f"# {title}", "",
             f"{env.get('gpu') or 'no GPU (nvidia-smi absent)'}; {env.get('date_utc')} UTC; python {env.get('python')}; "
             f"{_version_text(env.get('versions', {}))}; wheels {_num(env.get('wheels_mib'))} MiB; "
             f"wall {time.time() - started_at:.0f} s of a {budget_s:.0f} s budget", "",
             "| item | step | status | wall s (estimate) | result |", "|---|---|---|---|---|"]
    for step in (r for r in output.records if r.get("kind") == "step"):
        key = (step["suite_item"], step["suite_step"])
        measurements = [r for r in output.records if r.get("kind") == "measurement"
                        and (r["suite_item"], r["suite_step"]) == key]
        results = [headline(r) for r in measurements] or [headline(step)]
        if step["status"] != "ok" and measurements:
            results.append(headline(step))
        wall = f"{_num(step.get('wall_s'))} ({_num(step.get('estimate_s'))})"
        lines.append(f"| {step['suite_item']} | {step['suite_step']} | {step['status']} | {wall} | "
                     + "<br>".join(x.replace("|", "/") for x in results) + " |")
    lines += ["", "Details: suite.md (tables, PERFORMANCE.md rows, target checks), suite.jsonl (every record), "
              "suite.log (all output)."]
    return "\n".join(lines) + "\n"


def _version_text(versions: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items() if v)


# ---- command line --------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="gpu", choices=("gpu", "rehearse"),
                        help="gpu: the H200 measurements; rehearse: every item on CPU, tiny shape")
    parser.add_argument("--items", default=",".join(map(str, ITEM_TITLES)),
                        help="comma-separated item numbers to run (a rerun after a fix: e.g. 3,6)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"whole-suite wall budget, counted from --started-at (default {GPU_BUDGET_S} on GPU, "
                             f"{REHEARSAL_BUDGET_S} in the rehearsal)")
    parser.add_argument("--started-at", type=float, default=None,
                        help="epoch seconds the call began (gpu_suite.sh passes it, so the install counts)")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or "runs/gpu_suite")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the steps")
    args = parser.parse_args(argv)
    args.items = _parse_items(args.items)
    if args.budget_s is None:
        args.budget_s = GPU_BUDGET_S if args.mode == "gpu" else REHEARSAL_BUDGET_S
    if args.started_at is None:
        args.started_at = time.time()
    return args


def _parse_items(text: str) -> list[int]:
    try:
        items = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        items = []
    if not items or any(i not in ITEM_TITLES for i in items):
        raise ValueError(f"--items {text!r}; allowed: comma-separated numbers from {min(ITEM_TITLES)} to "
                         f"{max(ITEM_TITLES)}")
    return items


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as error:
        print(f"gpu_suite: error: {error}", file=sys.stderr)
        return 2
    output = SuiteOutput(Path(args.out_dir), rehearsal=args.mode == "rehearse")
    output.add_record(environment_record(args.python), None)
    records_path = output.jsonl.resolve()
    steps = (gpu_steps if args.mode == "gpu" else rehearsal_steps)(records_path)
    results = run_suite([s for s in steps if s.item in args.items], budget_s=args.budget_s,
                        started_at=args.started_at, python=args.python, output=output)
    text = summary(output, budget_s=args.budget_s, started_at=args.started_at)
    path = output.write_summary(text)
    print("\n" + text + f"(written to {path})", flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
