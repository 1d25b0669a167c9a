"""An evaluation killed mid-run resumes from its predictions log: the finished answers are
not generated again and the final table equals that of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gazal_nemo.testing.tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
NUM_QUESTIONS = 24


def _command(model, data, out):
    return [sys.executable, "-m", "gazal_nemo.cli", "eval", "--model", str(model), "--engine", "megatron",
            "--benchmarks", "medqa", "--data", str(data), "--max-new-tokens", "24", "--batch-size", "2",
            "--system-prompt", "Answer with \\boxed{X}.", "--out", str(out)]


def _lines(out):
    path = out / "predictions.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def _table(out):
    results = json.loads((out / "results.json").read_text())["results"]
    for row in results.values():
        row.pop("questions_per_s")
    return results


def test_killed_evaluation_resumes_to_the_uninterrupted_table(tiny_hf_dir, tmp_path):
    words = ["chest", "pain", "aspirin", "heparin", "troponin", "leads", "plan", "system"]
    rows = [{"question": f"Which option is the word {words[i % 8]} in case {i}?",
             "options": dict(zip("ABCD", words[i % 5:i % 5 + 4])), "answer_idx": "ABCD"[i % 4]}
            for i in range(NUM_QUESTIONS)]
    data = write_jsonl(tmp_path / "medqa.jsonl", rows)

    whole = tmp_path / "whole"
    done = subprocess.run(_command(tiny_hf_dir, data, whole), capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr

    part = tmp_path / "part"
    proc = subprocess.Popen(_command(tiny_hf_dir, data, part), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(_lines(part)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(_lines(part))
    assert 4 <= finished < NUM_QUESTIONS, f"kill came too late or too early: {finished} answers logged"
    assert not (part / "results.json").exists()

    resumed = subprocess.run(_command(tiny_hf_dir, data, part), capture_output=True, text=True, cwd=ROOT,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming, {finished} of {NUM_QUESTIONS} answers already" in resumed.stdout
    ids = [json.loads(line)["prompt_id"] for line in _lines(part) if line.strip()]
    assert len(ids) == NUM_QUESTIONS == len(set(ids))  # nothing generated twice
    assert _table(part) == _table(whole)
    by_id = {json.loads(x)["prompt_id"]: json.loads(x)["completion"] for x in _lines(whole)}
    assert {json.loads(x)["prompt_id"]: json.loads(x)["completion"] for x in _lines(part) if x.strip()} == by_id



def test_resume_with_other_settings_is_refused(tiny_hf_dir, tmp_path, capsys):
    from gazal_nemo.cli import main
    from gazal_nemo.eval.run import SETTINGS

    data = write_jsonl(tmp_path / "medqa.jsonl", [{"question": "Q?", "options": {"A": "a", "B": "b"},
                                                   "answer_idx": "A"}])
    out = tmp_path / "eval"
    out.mkdir()
    args = _command(tiny_hf_dir, data, out)[3:]
    assert main(args + ["--dry-run"]) == 0  # nothing recorded yet: any settings go
    (out / SETTINGS).write_text(json.dumps({"model": str(tiny_hf_dir), "decoding": {"temperature": 0.6}}))
    assert main(args) == 2
    assert "holds an evaluation with other settings (" in capsys.readouterr().err
