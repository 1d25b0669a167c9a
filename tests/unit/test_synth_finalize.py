"""Finalize on hand-made chunks (no model): a duplicate, a near-duplicate and a row holding a MedQA
question are removed with their reasons, failed examples and rejected attempts land in
rejected.jsonl, and the report counts all of it; finalizing again gives the same files."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from gazal_nemo.synth.attributes import draw_attributes
from gazal_nemo.synth.chunks import ChunkWriter
from gazal_nemo.synth.config import load_synth_recipe
from gazal_nemo.synth.finalize import finalize
from gazal_nemo.synth.prompts import sft_messages
from gazal_nemo.testing.tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
MEDQA_QUESTION = ("A 23-year-old woman presents with fatigue, pallor and koilonychia after months of heavy "
                  "menstrual bleeding; her ferritin is low. Which of the following is the most appropriate next step?")
CASE = ("A {age} man with diabetes and chronic kidney disease presents with three days of fever, flank pain and "
        "vomiting. Temperature 39.1 C, heart rate 118, blood pressure 92/58. Creatinine has risen from 1.8 to "
        "3.2 mg/dL; lactate is 3.1. Urine shows pyuria and nitrites. What do you do first, and why?")


def _recipe(tmp_path, bench):
    return load_synth_recipe(ROOT / "recipes" / "tiny_cpu_synth.yaml", [
        "generator.model=x", f"output_dir={tmp_path}", "num_examples=6", "chunk_size=3", "rows_per_file=2",
        f"decontam.benchmarks=[{{name: medqa, path: {bench}}}]"])


def _chunks(recipe, out, cases):
    for chunk, indices in ((0, range(0, 3)), (1, range(3, 6))):
        writer = ChunkWriter(out, chunk)
        for index in indices:
            attrs = draw_attributes(recipe.design, recipe.seed, index).to_json()
            module = attrs["module"]
            writer.write({"type": "rejected", "index": index, "module": module, "stage": "response", "attempt": 1,
                          "reasons": ["no_think_block: no <think>"], "text": "x"})
            if cases[index] is None:
                writer.write({"type": "example", "status": "failed", "index": index, "module": module,
                              "attributes": attrs, "stage": "response", "reasons": ["too_few_steps: 3 < 8"],
                              "attempts": 3})
                continue
            answer = f"<think>\nstep {index}\n</think>\nassessment {index}"
            writer.write({"type": "example", "status": "kept", "index": index, "id": f"x-{index}", "module": module,
                          "attributes": attrs, "case": cases[index], "generation": answer,
                          "messages": sft_messages(recipe, cases[index], answer)})
        writer.finish({"chunk": chunk, "start": indices.start, "stop": indices.stop,
                       "counters": {"requests": 6, "prompt_tokens": 600, "completion_tokens": 300, "seconds": 2.0}})


def test_duplicates_and_contamination_are_removed_with_reasons(tmp_path):
    bench = write_jsonl(tmp_path / "medqa_test.jsonl", [{"id": "q7", "question": MEDQA_QUESTION, "answer_idx": "A",
                                                          "options": {"A": "Oral iron", "B": "Transfusion"}}])
    out = tmp_path / "run"
    recipe = _recipe(out, bench)
    near = CASE.format(age="58-year-old").replace("vomiting", "repeated vomiting")
    cases = [CASE.format(age="58-year-old"), CASE.format(age="58-year-old").upper(), near,
             "Revise this for a quiz. " + MEDQA_QUESTION, None,
             "A 3-week-old boy is brought in with poor feeding, lethargy and a temperature of 38.4 C; the fontanelle "
             "is full. What is the next step in his care?"]
    _chunks(recipe, out, cases)
    report = finalize(recipe, out)
    rows = [json.loads(line) for path in sorted((out / "data").glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 5] and "status" not in rows[0] and "type" not in rows[0]
    assert [p.name for p in sorted((out / "data").iterdir())] == ["tiny_cpu_synth-00000-of-00001.jsonl"]
    records = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    removed = {r["index"]: r for r in records if r["type"] == "removed"}
    assert {i: r["reason"] for i, r in removed.items()} == {1: "duplicate_exact", 2: "duplicate_near",
                                                           3: "contaminated"}
    assert removed[1]["duplicate_of"] == 0 and removed[2]["duplicate_of"] == 0
    assert removed[3]["benchmark_questions"] == [["medqa", "q7"]]
    assert [r["index"] for r in records if r["type"] == "example"] == [4]
    assert sum(r["type"] == "rejected" for r in records) == 6
    assert report["dedup"] == {"field": "case", "exact": 1, "near": 1}
    assert report["decontam"]["rows_removed"] == 1 and report["decontam"]["contaminated_questions"] == {"medqa": 1}
    assert report["final_rows"] == 2 and report["acceptance"]["kept"] == 5 and report["acceptance"]["failed"] == 1
    assert report["throughput"]["completion_tokens"] == 600 and report["throughput"]["completion_tokens_per_s"] == 150
    module_rows = [r for r in report["attribute_rates"] if r["key"].startswith("module=")]
    assert sum(r["planned"]["num_with"] for r in module_rows) == 6 and sum(r["kept"]["num_with"] for r in module_rows) == 2
    svg = ET.fromstring((out / "rates.svg").read_text())
    with_bars = [r for r in report["attribute_rates"] if r["kept"]["rate"] is not None]  # a module with no kept row: none
    assert 0 < len(with_bars) < len(report["attribute_rates"])
    assert len(svg.findall("{http://www.w3.org/2000/svg}rect")) == 1 + len(with_bars)
    assert "1 rows removed for 1 benchmark questions found (medqa 1 of 1" in (out / "report.md").read_text()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "report.json"}
    finalize(recipe, out)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "report.json"}
    assert after == before and not (out / ".data.partial").exists() and not (out / ".work").exists()
