"""Step metrics to the console (a progress line), JSONL and TensorBoard; rank 0 only.

MFU uses the standard 6·N·tokens + attention estimate against the device's dense bf16
peak; on CPU (no known peak) it is left out rather than guessed.

A logging folder belongs to one run: `gazal_run.json` names the run whose metrics.jsonl it
holds (training/run_folder.py writes it when the run starts). A job of that run appends, after
dropping the rows of steps it replays; a job of another run is refused before it starts
(`logging_dir_problem`) and the logger itself never rewrites rows of another run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROLLED_BACK_FILE = "metrics_rolled_back.jsonl"
METRICS_FILE = "metrics.jsonl"
RUN_OWNER_FILE = "gazal_run.json"  # which run the rows belong to (training/run_folder.py)
# Dense bf16 peak (no sparsity), TFLOP/s.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in _PEAK_TFLOPS.items() if k in name), None)


def train_flops_per_token(*, num_params: int, num_layers: int, hidden: int, seq_length: int,
                          recompute: bool) -> float:
    """6N for forward+backward (8N with full recompute) plus causal attention scores."""
    dense = (8 if recompute else 6) * num_params
    attention = (4 if recompute else 3) * 2 * num_layers * hidden * seq_length
    return dense + attention


class MetricsLogger:
    """Writes each logged step everywhere it is asked to go."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0):
        """resume_step: the step this job resumes after; rows logged beyond it by an earlier
        job (steps it replays now) are dropped, so the log keeps one row per step."""
        self.enabled = enabled
        self.total_steps = total_steps
        self.start = time.time()
        self.tb = None
        if not enabled:
            return
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        _refuse_foreign_rows(self.dir)
        truncate_metrics_jsonl(self.dir / "metrics.jsonl", keep_through_step=resume_step)
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides events at steps >= it that an earlier job wrote
                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                print("tensorboard is not installed: TensorBoard logging is off", file=sys.stderr)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.start, 3), **_plain(metrics)}
        self.jsonl.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        print(self._progress_line(step, row), flush=True)

    def event(self, step: int, name: str, value: float = 1.0) -> None:
        """A marker in TensorBoard (e.g. guard/rollback at the step it fired)."""
        if self.enabled and self.tb is not None:
            self.tb.add_scalar(name, value, step)
            self.tb.flush()

    def rewind(self, step: int) -> None:
        """Move the rows after `step` to metrics_rolled_back.jsonl (a rollback replays those steps
        with other data; the old rows stay for the record and the guard's plot)."""
        if not self.enabled:
            return
        self.jsonl.close()
        path = self.dir / "metrics.jsonl"
        dropped = [row for row in read_metrics_jsonl(path, through_step=10**12) if int(row["step"]) > step]
        with open(self.dir / ROLLED_BACK_FILE, "a") as kept:  # what the run did before it rolled back
            kept.writelines(json.dumps(row) + "\n" for row in dropped)
        truncate_metrics_jsonl(path, keep_through_step=step)
        self.jsonl = open(path, "a", buffering=1)

    def _progress_line(self, step: int, row: dict) -> str:
        width = 20
        done = int(width * step / max(self.total_steps, 1))
        elapsed = time.time() - self.start
        eta = elapsed / max(step, 1) * max(self.total_steps - step, 0)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("step", "time_s"))
        return f"[{'#' * done}{'.' * (width - done)}] step {step}/{self.total_steps} eta {eta:.0f}s {shown}"

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def read_run_owner(log_dir: str | Path) -> dict | None:
    """The logging folder's gazal_run.json (None when absent or unreadable)."""
    try:
        owner = json.loads((Path(log_dir) / RUN_OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def has_logged_rows(log_dir: str | Path) -> bool:
    log_dir = Path(log_dir)
    return any((log_dir / name).is_file() and (log_dir / name).stat().st_size > 0
               for name in (METRICS_FILE, ROLLED_BACK_FILE))


def logging_dir_problem(log_dir: str | Path, run_id: str, *, adopt_unmarked: bool) -> str | None:
    """Why run `run_id` may not log into log_dir (None: it may). Rows of the same run, or no rows,
    are fine; rows of another run, or rows of no known run (unless `adopt_unmarked`: a resume of
    a run from before these markers), are not."""
    log_dir = Path(log_dir)
    if not has_logged_rows(log_dir):
        return None
    owner = read_run_owner(log_dir)
    if owner is not None and owner.get("run_id") == run_id:
        return None
    if owner is None and adopt_unmarked:
        return None
    whose = (f"run {owner.get('run_id')} (checkpoint.dir {owner.get('checkpoint_dir')}, started "
             f"{owner.get('created_at')})" if owner is not None else "a run of unknown checkpoint.dir")
    return (f"logging.dir={log_dir}: holds the metrics of {whose}, not of this run ({run_id}); a new run there "
            f"would drop its rows; use another logging.dir (or move {log_dir / METRICS_FILE} away)")


def claim_logging_dir(log_dir: str | Path, record: dict) -> None:
    """Mark log_dir as the run's (`record` holds its run_id); rank 0, after logging_dir_problem."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if (read_run_owner(log_dir) or {}).get("run_id") != record["run_id"]:
        tmp = log_dir / (RUN_OWNER_FILE + ".part")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, log_dir / RUN_OWNER_FILE)


def _refuse_foreign_rows(log_dir: Path) -> None:
    """Last line of defence: within a stage (an active run), never rewrite another run's rows."""
    from gazal_nemo.training.run_identity import active_run

    run = active_run()
    if run is not None and has_logged_rows(log_dir):
        owner = read_run_owner(log_dir)
        if owner is None or owner.get("run_id") != run.run_id:
            raise ValueError(logging_dir_problem(log_dir, run.run_id, adopt_unmarked=False)
                             or f"logging.dir={log_dir}: not this run's")


def read_metrics_jsonl(path: Path, *, through_step: int) -> list[dict]:
    """The logged rows with step <= through_step (a torn line is skipped)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and int(row.get("step", 0)) <= through_step:
                rows.append(row)
    return rows


def truncate_metrics_jsonl(path: Path, *, keep_through_step: int) -> int:
    """Drop rows with step > keep_through_step (and a torn last line) by an atomic rewrite;
    returns how many rows were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line cut by a kill mid-write
            continue
        if step <= keep_through_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def _plain(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = v
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
