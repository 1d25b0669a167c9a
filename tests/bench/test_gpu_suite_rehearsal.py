"""The GPU suite's CPU rehearsal (issue 10): `bench/gpu_suite.sh --rehearse` runs every item
with the tiny shape and records each, so the one device call is not spent on a typo.

TRL is not a project dependency. The rehearsal installs it from `.whl/trl-*.whl` when that
wheel was fetched (bench/README.md); without it (CI) the TRL baseline must be recorded as
skipped with the reason, and that is the only non-ok record accepted.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_suite  # noqa: E402

ITEMS = tuple(gpu_suite.ITEM_TITLES)


def _trl_expected() -> bool:
    return importlib.util.find_spec("trl") is not None or any((ROOT / ".whl").glob("trl-*.whl"))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite_out")
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), GPU_SUITE_SITE=str(tmp_path_factory.mktemp("site")))
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--rehearse"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    return proc, out, _records(out)


@pytest.mark.slow
def test_rehearsal_records_every_item_ok(rehearsal):
    proc, _, records = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    measurements = [r for r in records if r.get("kind") == "measurement"]
    for item in ITEMS:
        mine = [r for r in measurements if r["suite_item"] == item]
        assert mine, f"item {item}: no measurement record"
        for r in mine:
            if r.get("variant") == "trl" and not _trl_expected():
                assert r["status"] == "skipped" and "trl is not importable" in r["error"], r
            else:
                assert r["status"] == "ok", (item, r.get("variant"), r.get("error"))
    steps = [r for r in records if r.get("kind") == "step"]
    assert {r["suite_item"] for r in steps} == set(ITEMS) and all(r["status"] == "ok" for r in steps)
    assert all(r["rehearsal"] is True and "no performance claim" in r["claim"] for r in records)


@pytest.mark.slow
def test_rehearsal_results_are_real(rehearsal):
    """The rows carry what each item is for, not only a status."""
    _, _, records = rehearsal
    by_bench = {}
    for r in records:
        by_bench.setdefault(r.get("bench"), []).append(r)
    parity = by_bench["bf16_parity"][0]
    assert parity["parity"] == "pass" and 0 < parity["ours_rel_err"] <= parity["tolerance"]
    sft = {r["variant"] for r in by_bench["dora_sft"]}
    assert {"hf-dora", "ours-dora", "ours-lora"} <= sft
    assert {r["variant"] for r in by_bench["grpo_step"]} >= {"trl", "ours"}
    plans = by_bench["memory_plan"]
    assert {r["stage"] for r in plans} == {"sft", "grpo"}
    for r in plans:  # the planner is used when it is importable, else the rows say so
        if importlib.util.find_spec("gazal_nemo.training.memory_plan") is not None:
            assert r["planner"] == "ok" and r["planned_allocated_gib"] > 0, r
        else:
            assert r["planner"].startswith("not importable")
    throughput = {r["variant"]: r for r in by_bench["train_throughput"]}
    assert set(throughput) == {"hf", "ours"}
    assert all(r["mfu_peak_tflops"] == gpu_suite.MEASURED_MATMUL_TFLOPS for r in throughput.values())
    demo = by_bench["demo"][0]
    assert (demo["sft_steps_logged"], demo["grpo_steps_logged"]) == (4, 2)


@pytest.mark.slow
def test_rehearsal_output_fits_what_the_device_tool_returns(rehearsal):
    """At most 8 files, 2 folders deep, plain names; the summary lists every step."""
    proc, out, _ = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for p in files for part in p.relative_to(out).parts)
    summary = (out / "summary.md").read_text()
    assert "no performance claim" in summary and summary in proc.stdout
    for item in ITEMS:
        assert re.search(rf"^\| {item} \| \S+ \| ok \|", summary, re.M), f"item {item} missing from the summary"


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--mode", "rehearse", "--items", "1,6",
                           "--budget-s", "5", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    steps = [r for r in _records(tmp_path) if r.get("kind") == "step"]
    assert [(r["suite_item"], r["status"]) for r in steps] == [(1, "skipped"), (6, "skipped")]
    assert all("budget" in r["error"] for r in steps)
    assert not [r for r in _records(tmp_path) if r.get("kind") == "measurement"]


def test_a_step_past_its_timeout_is_stopped_and_keeps_its_finished_records(tmp_path):
    """What a step printed before its timeout is already in suite.jsonl; the step says timeout."""
    output = gpu_suite.SuiteOutput(tmp_path / "out", rehearsal=True)
    code = ("import time; print('BENCH_JSON ' + '{\"bench\": \"x\", \"variant\": \"first\", \"status\": \"ok\"}',"
            " flush=True); time.sleep(120)")
    step = gpu_suite.Step(item=1, name="sleeper", argv=("-c", code), estimate_s=1, timeout_s=3)
    record = gpu_suite.run_step(step, timeout_s=3, python=sys.executable, scratch=tmp_path / "scratch",
                                output=output)
    assert record["status"] == "timeout" and record["wall_s"] < 30
    assert [(r["kind"], r.get("variant")) for r in _records(tmp_path / "out")] == [("measurement", "first"),
                                                                                 ("step", None)]


def test_unknown_item_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--items", "2,9", "--out-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["gpu_suite: error: --items '2,9'; allowed: comma-separated "
                                                "numbers from 1 to 6"]
