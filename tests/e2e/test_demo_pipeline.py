"""The README's main job: `gazal demo` runs convert -> SFT -> export -> GRPO on a tiny CPU
model, and GRPO raises the accuracy reward on its verifiable MCQ task."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_demo_runs_the_pipeline_and_grpo_learns(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", "demo", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    work = tmp_path / "demo"
    for path in ("base_megatron/metadata.json", "sft/export/adapter/adapter_config.json",
                 "sft/export/merged/config.json", "sft/export/merged/model.safetensors.index.json"):
        assert (work / path).is_file(), path
    sft = [json.loads(x) for x in (work / "sft/logs/metrics.jsonl").read_text().splitlines()]
    assert sft[-1]["loss"] < 0.1 * sft[0]["loss"]
    grpo = [json.loads(x) for x in (work / "grpo/logs/metrics.jsonl").read_text().splitlines()]
    accuracy = [r["reward/accuracy"] for r in grpo]
    early, late = sum(accuracy[:5]) / 5, sum(accuracy[-10:]) / 10
    assert len(grpo) == 60
    assert late >= early + 0.15, f"GRPO did not learn: accuracy {early:.2f} (first 5 steps) -> {late:.2f} (last 10)"
    assert "GRPO accuracy reward" in proc.stdout
