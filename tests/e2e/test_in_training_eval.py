"""In-training evaluation: the SFT stage scores a held-out MedQA-format slice every N steps with
its own weights, and the number equals what `gazal eval` prints for the exported model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LIMIT, NEW_TOKENS = 16, 24


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_sft_logs_held_out_accuracy_every_n_steps_equal_to_gazal_eval(tmp_path, tiny_hf_dir):
    from gazal_nemo.commands.demo_data import TINY_SYSTEM_PROMPT, write_demo_benchmark, write_demo_data

    data = write_demo_data(tmp_path / "data", tiny_hf_dir, num_sft=64, num_grpo=4)["sft"]
    bench = write_demo_benchmark(tmp_path / "medqa.jsonl", num_questions=LIMIT + 8)
    _cli("sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}", f"sft_data.sources.0.path={data}",
         "train.max_steps=30", f"checkpoint.dir={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / 'logs'}",
         f"export_dir={tmp_path / 'export'}", "eval_during_training.every=15", f"eval_during_training.data={bench}",
         f"eval_during_training.limit={LIMIT}", f"eval_during_training.max_new_tokens={NEW_TOKENS}",
         f"eval_during_training.system_prompt={TINY_SYSTEM_PROMPT}")
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in rows if "eval/medqa/accuracy" in r]
    assert evaluated == [15, 30]
    _cli("eval", "--model", str(tmp_path / "export" / "merged"), "--benchmarks", "medqa", "--data", str(bench),
         "--limit", str(LIMIT), "--max-new-tokens", str(NEW_TOKENS), "--engine", "megatron", "--out", str(tmp_path / "eval"),
         "--system-prompt", TINY_SYSTEM_PROMPT)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ours = results["results"]["medqa"] if "results" in results else results["medqa"]
    final = rows[-1]
    assert final["eval/medqa/accuracy"] == pytest.approx(ours["accuracy"])
    assert final["eval/medqa/extraction_failure_rate"] == pytest.approx(ours["extraction_failure_rate"])
    assert final["eval/medqa/extraction_failure_rate"] < 1.0, "the model never answered: the test compares nothing"
