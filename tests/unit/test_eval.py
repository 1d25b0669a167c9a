"""Benchmark loaders (real column layouts) and the `gazal eval` command on the tiny model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.eval.benchmarks import load_benchmark
from gazal_nemo.testing.tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[2]

ROWS = {
    "medqa": ({"question": "Q1?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "C",
               "answer": "c"}, "C", 4),
    "medmcqa": ({"question": "Q2?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1}, "B", 4),
    "pubmedqa": ({"question": "Does X cause Y?", "context": {"contexts": ["Abstract text."]},
                  "final_decision": "maybe"}, "C", 3),
    "mmlu_pro_medical": ({"question": "Q4?", "options": list("abcdefghij"), "answer": "J", "category": "health"},
                         "J", 10),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_loaders_map_real_columns(tmp_path, name):
    row, gold, num_options = ROWS[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [row, row])
    rows = load_benchmark(name, str(path))
    assert len(rows) == 2 and rows[0]["answer"] == gold and len(rows[0]["options"]) == num_options
    if name == "pubmedqa":
        assert "Abstract text." in rows[0]["question"]


def test_mmlu_pro_keeps_only_the_medical_category(tmp_path):
    row = dict(ROWS["mmlu_pro_medical"][0])
    other = dict(row, category="law")
    rows = load_benchmark("mmlu_pro_medical", str(write_jsonl(tmp_path / "m.jsonl", [row, other, row])))
    assert len(rows) == 2


def test_bad_row_is_named(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS["medmcqa"][0], {"question": "no options", "cop": 0}])
    with pytest.raises(ValueError, match="row 1 is not a medmcqa row"):
        load_benchmark("medmcqa", str(path))
    with pytest.raises(ValueError, match="allowed: medqa"):
        load_benchmark("medqa_v2", str(path))


def test_eval_cli_runs_on_tiny_model(tiny_hf_dir, tmp_path):
    data = write_jsonl(tmp_path / "medqa.jsonl", [ROWS["medqa"][0]] * 3)
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", "eval", "--model", str(tiny_hf_dir),
                           "--benchmark", "medqa", "--data", str(data), "--max-new-tokens", "6", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["questions"] == 3 and 0 <= result["correct"] <= 3
    # A random tiny model never writes \boxed{X}: every question is unanswered, none correct.
    assert result["unanswered"] == 3 and result["accuracy"] == 0.0
