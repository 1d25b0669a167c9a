"""The collapse guard on real (tiny, CPU) GRPO runs: the two fastest collapse types of the
guard benchmark and one healthy run (bench/bench_guard.py runs every type over several seeds;
its results are in docs/GRPO.md).

A model fine-tuned on answers with a bold word is trained by GRPO; for steps 16-20 a reward
plug-in (gazal_nemo/testing/collapse.py) pays for one degenerate behaviour, so the policy really
goes into it: markdown markers everywhere (the paper's step-526 symptom), or answers that run on
to the length limit. The guard must notice within a few steps from the metrics' own noise (no
threshold tuned on these runs), restore the last healthy checkpoint (taken before the onset),
skip the data seen since, and the run must end at its pre-collapse accuracy and signal. The healthy run, the same but without the plug-in, is never rolled back (nor is the
demo's: tests/e2e/test_demo_pipeline.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.testing.guard_bench import (
    BENCH_OVERRIDES,
    CASES,
    collapse_env,
    grpo_overrides,
    judge_run,
    seen_rows,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
FIRST, LAST, STEPS, HEALTHY_STEPS = 16, 20, 32, 30
DETECT_WITHIN = 6  # steps after the onset step
DRIFT = {"markup": 0.08, "run_on": 0.2}  # how far the policy must have gone (and come back) for the run to count


def _cli(*args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=env)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def markdown_model(tmp_path_factory, tiny_hf_dir):
    """The tiny Qwen3 after SFT on answers that put the asked word in bold."""
    from gazal_nemo.commands.demo_data import fact_mcq_rows
    from gazal_nemo.testing.collapse import markdown_sft_rows
    from gazal_nemo.testing.tiny import write_jsonl

    work = tmp_path_factory.mktemp("guard")
    sft = write_jsonl(work / "sft.jsonl", markdown_sft_rows(256, seed=0))
    grpo = write_jsonl(work / "grpo.jsonl", fact_mcq_rows(256, seed=7))
    _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}", f"sft_data.sources.0.path={sft}",
         "train.max_steps=130", f"checkpoint.dir={work / 'sft' / 'ckpt'}", f"logging.dir={work / 'sft' / 'logs'}",
         f"export_dir={work / 'sft' / 'export'}")
    return {"model": work / "sft" / "export" / "merged", "grpo": grpo}


def _grpo(model, tmp_path, name, steps):
    return _cli("grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml", f"model.hf_path={model['model']}",
                f"grpo.data.path={model['grpo']}", f"train.max_steps={steps}", "checkpoint.save_every=5",
                f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'logs'}", "export_dir=null", *BENCH_OVERRIDES,
                *grpo_overrides(CASES[name], seed=1), env=dict(os.environ, **collapse_env(FIRST, LAST)))


@pytest.mark.parametrize("name", ["markup", "run_on"])
def test_induced_collapse_is_detected_rolled_back_and_the_run_ends_healthy(name, tmp_path, markdown_model):
    case = CASES[name]
    proc = _grpo(markdown_model, tmp_path, name, STEPS)
    result = judge_run(tmp_path / "logs", case, first=FIRST, last=LAST)
    assert result["detected_at"] is not None, f"no rollback: the guard missed the collapse\n{result}\n" + proc.stdout[-3000:]
    assert result["early_alarms"] == 0 and result["delay"] <= DETECT_WITHIN, result
    first = result["events"][0]
    assert first["to_step"] < FIRST, first  # a checkpoint from before the onset
    assert "guard: rolled back from step" in proc.stdout
    # The policy really went into the behaviour (in the steps the rollback undid).
    assert abs(result["signal_worst"] - result["signal_pre"]) > DRIFT[name], result

    rows = _rows(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one row per step after the rollbacks"
    assert result["restored"], result  # accuracy of the last 5 steps >= pre-collapse - 0.1
    end = sum(r[case.signal] for r in rows[-5:]) / 5
    assert abs(end - result["signal_pre"]) < DRIFT[name], (end, result)
    last_good = list((tmp_path / "ckpt" / "last_good").iterdir())
    assert len(last_good) == 1 and last_good[0].name.startswith("step_")
    _replay_fires_where_the_run_did(tmp_path, first)


def _replay_fires_where_the_run_did(tmp_path, event):
    """`gazal guard` on what the live guard had seen at its first rollback rolls back at the same
    step, for the same reasons."""
    seen = tmp_path / "seen" / "metrics.jsonl"
    seen.parent.mkdir()
    seen.write_text("".join(json.dumps(r) + "\n" for r in seen_rows(tmp_path / "logs")))
    proc = _cli("guard", "--recipe", "recipes/tiny_cpu_grpo.yaml", "--logs", str(seen.parent), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"would roll back at step {event['from_step']}: {'; '.join(event['reasons'])}" in proc.stdout


def test_a_healthy_run_is_never_rolled_back(tmp_path, markdown_model):
    _grpo(markdown_model, tmp_path, "healthy", HEALTHY_STEPS)
    result = judge_run(tmp_path / "logs", CASES["healthy"], first=FIRST, last=LAST)
    assert result["false_alarms"] == 0, result["events"]
    assert result["steps"] == HEALTHY_STEPS
    assert "no rollback" in _cli("guard", "--recipe", "recipes/tiny_cpu_grpo.yaml", "--logs", str(tmp_path / "logs")).stdout
