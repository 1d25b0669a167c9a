"""scripts/plot_guard_run.py draws the kept run, the undone stretch and the rollback marker."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_marks_the_rollback_and_draws_the_undone_steps_dashed(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "reward/accuracy": 0.3 + 0.01 * s} for s in range(1, 21)])
    _write(tmp_path / "metrics_rolled_back.jsonl", [{"step": s, "reward/accuracy": 0.1} for s in range(11, 15)])
    _write(tmp_path / "guard_events.jsonl", [{"event": "rollback", "from_step": 14, "to_step": 10, "reasons": ["x"]}])
    out = tmp_path / "plot.svg"
    proc = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out),
                           "--metrics", "reward/accuracy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    svg = out.read_text()
    assert svg.count("<polyline") == 2 and 'stroke-dasharray="5,4"' in svg
    assert "rollback at 14" in svg and "-&gt; step 10" not in svg and "-> step 10" in svg
    bad = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out), "--metrics", "nope"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no metric 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_plot_shades_the_induced_window_and_refuses_a_bad_one(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "reward/accuracy": 0.3} for s in range(1, 21)])
    out = tmp_path / "plot.svg"
    plain = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out),
                            "--metrics", "reward/accuracy"], cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode == 0 and "fill-opacity" not in out.read_text()
    shaded = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out),
                             "--metrics", "reward/accuracy", "--window", "11,15"], cwd=ROOT, capture_output=True, text=True)
    assert shaded.returncode == 0 and out.read_text().count("fill-opacity") == 1 and "shaded:" in out.read_text()
    bad = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out),
                          "--window", "eleven"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--window 'eleven'" in bad.stderr and "Traceback" not in bad.stderr


def test_two_rollbacks_over_the_same_steps_are_two_dashed_stretches(tmp_path):
    _write(tmp_path / "metrics.jsonl", [{"step": s, "reward/accuracy": 0.3} for s in range(1, 21)])
    _write(tmp_path / "metrics_rolled_back.jsonl", [{"step": s, "reward/accuracy": 0.1 * k} for k in (1, 2)
                                                    for s in range(11, 15)])
    _write(tmp_path / "guard_events.jsonl", [{"event": "rollback", "from_step": 14, "to_step": 10, "reasons": ["x"]}] * 2)
    out = tmp_path / "plot.svg"
    proc = subprocess.run([sys.executable, "scripts/plot_guard_run.py", str(tmp_path), str(out),
                           "--metrics", "reward/accuracy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dashed = [line for line in out.read_text().splitlines() if 'stroke-dasharray="5,4"' in line]
    points = [line.split('points="')[1].split('"')[0].split() for line in dashed]
    assert [len(p) for p in points] == [5, 5]  # step 10, then 11-14, once per rollback
