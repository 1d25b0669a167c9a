"""The collapse guard on a real (tiny, CPU) GRPO run with an induced collapse.

A model fine-tuned on answers with a bold word is trained by GRPO; for steps 16-24 a reward
plug-in pays for every markdown marker (gazal_nemo/testing/collapse.py), so the policy really
drifts into asterisk runs, the paper's step-526 symptom. The guard must notice within a few
steps, restore the last healthy checkpoint (taken before the drift), skip the data seen since,
and the run must end healthy: markup back near its pre-collapse level, accuracy not below it.
The demo's healthy run triggering no rollback is checked in tests/e2e/test_demo_pipeline.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
COLLAPSE_FIRST, COLLAPSE_LAST, STEPS = 16, 24, 36
DETECT_WITHIN = 8  # steps after the collapse reward stops at the latest
MARKUP = "degenerate/markup_density"


def _cli(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


def test_induced_collapse_is_detected_rolled_back_and_the_run_ends_healthy(tmp_path, markdown_model):
    per_step = 32 * 4  # completions scored per step (prompts x generations), for the plug-in's window
    env = dict(os.environ, GAZAL_TEST_COLLAPSE=f"{COLLAPSE_FIRST},{COLLAPSE_LAST},{per_step}")
    logs = tmp_path / "logs"
    proc = _cli("grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml", f"model.hf_path={markdown_model['model']}",
                f"grpo.data.path={markdown_model['grpo']}", f"train.max_steps={STEPS}", "checkpoint.save_every=5",
                f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={logs}",
                "grpo.rewards.plugins={gazal_nemo.testing.collapse:markup_bonus: 1.0}",
                "grpo.sampling.train_logprobs=temperature", env=env)  # the dynamics this test was tuned on
    events = _rows(logs / "guard_events.jsonl")
    assert events, "no rollback: the guard missed the collapse\n" + proc.stdout[-3000:]
    first = events[0]
    # Noticed while the reward pays for the symptom or just after it stops paying (RL on a tiny
    # model drifts at its own pace), and rolled back to a checkpoint from before it was visible.
    assert COLLAPSE_FIRST <= first["from_step"] <= COLLAPSE_LAST + DETECT_WITHIN, first
    assert first["to_step"] <= COLLAPSE_LAST and first["data_offset"] == first["from_step"] - first["to_step"]
    assert any(MARKUP in reason for reason in first["reasons"]), first
    assert "guard: rolled back from step" in proc.stdout

    rows = _rows(logs / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "one row per step after the rollback"
    before = [r for r in rows if 5 < r["step"] < COLLAPSE_FIRST]  # healthy, the same rows in both lives
    baseline_markup = sum(r[MARKUP] for r in before) / len(before)
    baseline_accuracy = sum(r["reward/accuracy"] for r in before) / len(before)
    collapsed = [r for r in _rows(logs / "metrics_rolled_back.jsonl") if r["step"] >= COLLAPSE_FIRST]
    assert max(r[MARKUP] for r in collapsed) > baseline_markup + 0.08, "the policy did not really drift"
    end = rows[-5:]
    assert sum(r[MARKUP] for r in end) / 5 < baseline_markup + 0.05, end
    assert sum(r["reward/accuracy"] for r in end) / 5 >= baseline_accuracy - 0.1, end
    last_good = list((tmp_path / "ckpt" / "last_good").iterdir())
    assert len(last_good) == 1 and last_good[0].name.startswith("step_")
