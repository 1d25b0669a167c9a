"""`gazal synth` end to end with the offline vLLM engine (the real CPU build) on a tiny random Qwen3,
through the engine protocol (chat template -> ids -> engine.generate -> decoded text), then
`gazal sft` trains on what it wrote.

A random model cannot follow the B.1 format, so the tiny recipe records the validators'
verdicts without enforcing them (validation.enforce=false); the strict path is exercised
against the vLLM server in test_synth_openai.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny_cpu_synth.yaml"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("teacher"), seed=0, head_dim=32, max_position_embeddings=2048)


def test_offline_vllm_synthesis_then_sft_trains_on_it(teacher_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from gazal_nemo.data.prompts import SFT_SYSTEM_PROMPT
    from gazal_nemo.synth.attributes import draw_attributes
    from gazal_nemo.synth.config import load_synth_recipe
    from gazal_nemo.synth.finalize import read_all_chunks

    out = tmp_path / "synth"
    overrides = [f"output_dir={out}", f"generator.model={teacher_dir}", "num_examples=10", "chunk_size=5"]
    assert main(["synth", "--recipe", str(RECIPE), *overrides]) == 0, capsys.readouterr().err[-3000:]
    printed = capsys.readouterr().out
    assert "synth: chunk 1 (2/2)" in printed
    recipe = load_synth_recipe(RECIPE, overrides)
    examples, rejected, footers = read_all_chunks(recipe, out)
    assert sorted(e["index"] for e in examples) == list(range(10))
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for path in sorted((out / "data").glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert [p.name for p in sorted((out / "data").iterdir())] == ["tiny_cpu_synth-00000-of-00002.jsonl",
                                                                   "tiny_cpu_synth-00001-of-00002.jsonl"]
    assert len(rows) == json.loads((out / "report.json").read_text())["final_rows"] >= 8
    for row in rows:
        assert row["attributes"] == draw_attributes(recipe.design, recipe.seed, row["index"]).to_json()
        assert row["messages"] == [{"role": "system", "content": SFT_SYSTEM_PROMPT},
                                   {"role": "user", "content": row["case"]},
                                   {"role": "assistant", "content": row["generation"]}]
        # the engine decoded what it generated: re-encoding gives back no more tokens than it was allowed
        assert 0 < row["tokens"]["completion"] <= 32 * row["attempts"] + 48 * row["attempts"]
        assert len(tokenizer(row["generation"], add_special_tokens=False)["input_ids"]) <= 3 * 48
        assert row["prompt"]["case"][1]["content"].startswith("Write one clinical case for training")
        assert row["validation"]["response"]["reasons"]  # recorded: a random model breaks the format
    assert sum(f["counters"]["completion_tokens"] for f in footers) > 0

    # a second run finds every chunk done: no engine, the same data
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    assert main(["synth", "--recipe", str(RECIPE), *overrides]) == 0
    assert "every chunk is done" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before

    sft = tmp_path / "sft"
    command = [sys.executable, "-m", "gazal_nemo.cli", "sft", "--recipe", "recipes/tiny_cpu_sft.yaml",
               f"model.hf_path={teacher_dir}", f"sft_data.sources.0.path={out / 'data'}",
               "sft_data.sources.0.format=messages", "sft_data.max_length=512", "train.seq_length=512",
               "train.max_steps=6", f"checkpoint.dir={sft / 'ckpt'}", f"logging.dir={sft / 'logs'}", "export_dir=null"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (sft / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 6 and all(loss == loss for loss in losses) and losses[-1] < losses[0], losses
