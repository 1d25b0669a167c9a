"""`bench/bench_guard.py --report --rates`: the recorded runs judged again from their logs, with
each collapse run's healthy twin and every run replayed at other false-alarm rates. Logs are
written here in the trainer's formats (metrics.jsonl, guard_events.jsonl,
metrics_rolled_back.jsonl), so the report reads what a benchmark run leaves."""

import json
import random
import subprocess
import sys
from pathlib import Path

from gazal_nemo.rl.guard_signals import MARKUP_METRIC

ROOT = Path(__file__).resolve().parents[2]


def _row(step, rng, markup=None):
    markup = max(0.0, rng.gauss(0.03, 0.01)) if markup is None else markup
    return {"step": step, "reward/accuracy": min(1.0, max(0.0, rng.gauss(0.4, 0.04))), MARKUP_METRIC: markup,
            "completion_len_mean": rng.gauss(30, 1), "entropy": rng.gauss(0.3, 0.02), "samples/completions": 128.0}


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _record(case, seed, logs, steps, **judged):
    return dict({"case": case, "seed": seed, "log_dir": str(logs), "exit_code": 0, "steps": steps, "device": "CPU",
                 "date": "2026-12-07", "commit": "abc1234", "judged_steps": 41 if case == "healthy" else None}, **judged)


def test_report_judges_the_logs_again_with_twins_and_a_rate_sweep(tmp_path):
    rng = random.Random(0)
    healthy = [_row(step, rng) for step in range(1, 61)]
    _write(tmp_path / "healthy" / "metrics.jsonl", healthy)
    other_rng = random.Random(2)  # a second healthy seed that drifts further, still below the collapse
    other = [_row(step, other_rng, markup=0.05 + 0.001 * step) for step in range(1, 61)]
    _write(tmp_path / "healthy2" / "metrics.jsonl", other)
    # A markup collapse from step 16 that the live guard rolled back at step 21 to step 15.
    collapse_rng = random.Random(1)
    before = [_row(step, collapse_rng) for step in range(1, 16)]
    undone = [_row(step, collapse_rng, markup=0.12) for step in range(16, 22)]
    kept = before + [_row(step, collapse_rng) for step in range(16, 41)]
    logs = tmp_path / "markup"
    _write(logs / "metrics.jsonl", kept)
    _write(logs / "metrics_rolled_back.jsonl", undone)
    _write(logs / "guard_events.jsonl", [{"event": "rollback", "from_step": 21, "to_step": 15,
                                          "reasons": ["degenerate/markup_density ..."]}])
    _write(tmp_path / "bench_guard.jsonl", [_record("markup", 1, logs, 40), _record("healthy", 1, tmp_path / "healthy", 60),
                                           _record("healthy", 2, tmp_path / "healthy2", 60)])

    proc = subprocess.run([sys.executable, "bench/bench_guard.py", "--report", "--out-dir", str(tmp_path),
                           "--rates", "1e-4,1e-9"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("| markup | 1 |"))
    twin_worst = max(r[MARKUP_METRIC] for r in healthy if 16 <= r["step"] <= 40)
    other_worst = max(r[MARKUP_METRIC] for r in other if 16 <= r["step"] <= 40)
    assert other_worst > twin_worst  # the range of every healthy run is the other seed's
    # before -> worst (twin's worst; every healthy run's worst) | beyond that range | onset -> rollback
    assert f"-> 0.12 ({twin_worst:.2f}; {other_worst:.2f}) | True | 5 (step 21) |" in line, line
    assert "Detected: 1 of 1 collapse runs; 1 of the 1 whose signal went beyond" in proc.stdout
    sweep = {x.split(" | ")[0].lstrip("| "): x for x in proc.stdout.splitlines() if x.startswith(("| 0.0001 ", "| 1e-09 "))}
    assert "| 0 of 2 | 0.0 | 1 of 1 | 5 (5) | 0 |" in sweep["0.0001"], sweep
    # At 1e-9 the threshold is beyond what the undone steps showed: not caught within the steps seen.
    assert "| 0 of 2 | 0.0 | 0 of 1 | - |" in sweep["1e-09"], sweep
    assert line in (tmp_path / "bench_guard.md").read_text()
