"""Benchmark loaders on hand-written files in each public layout (and the bad cases), the
adapted B.2 prompt, answer extraction after the reasoning block, scoring against hand
computations, permutations, and the `gazal eval` command on the tiny model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.eval.loaders import load_benchmark
from gazal_nemo.testing.tiny import write_jsonl

ROOT = Path(__file__).resolve().parents[2]

MEDQA_US4 = {"question": "Q1?", "answer": "c", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
             "meta_info": "step1", "answer_idx": "C"}
MEDQA_US5 = dict(MEDQA_US4, options={"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, answer_idx="E", answer="e")
MEDMCQA = {"id": "m1", "question": "Q2?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": 1,
           "choice_type": "single", "subject_name": "Pharmacology"}
PQA_LABELED = {"pubid": 21645374, "question": "Does X cause Y?",
               "context": {"contexts": ["Abstract text.", "More."], "labels": ["BACKGROUND", "RESULTS"]},
               "long_answer": "It does.", "final_decision": "maybe"}
MMLU_PRO = {"question_id": 70, "question": "Q4?", "options": list("abcdefghij"), "answer": "J", "answer_index": 9,
            "cot_content": "", "category": "health", "src": "ori_mmlu-clinical_knowledge"}


def _write(tmp_path, name, rows):
    return str(write_jsonl(tmp_path / name, rows))


def _load(name, path, **kwargs):
    return load_benchmark(name, path, **kwargs)[0]


# --- loaders: each public layout ----------------------------------------------------------------


def test_medqa_us_jsonl_4_and_5_options(tmp_path):
    four = _load("medqa", _write(tmp_path, "us4.jsonl", [MEDQA_US4] * 2))
    five = _load("medqa", _write(tmp_path, "us5.jsonl", [MEDQA_US5]))
    assert [q.answer for q in four] == ["C", "C"] and list(four[0].options) == list("ABCD")
    assert five[0].answer == "E" and five[0].options["E"] == "e"


def test_medqa_key_value_list_parquet_struct_and_bigbio(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = dict(MEDQA_US4, options=[{"key": k, "value": v} for k, v in MEDQA_US4["options"].items()])
    assert _load("medqa", _write(tmp_path, "kv.jsonl", [listed]))[0].answer == "C"
    # A parquet struct column has every letter any row has; a 4-option row gets E = None.
    table = pa.Table.from_pylist([MEDQA_US5, dict(MEDQA_US4, options=dict(MEDQA_US4["options"], E=None))])
    pq.write_table(table, tmp_path / "medqa.parquet")
    rows = _load("medqa", str(tmp_path / "medqa.parquet"))
    assert [len(q.options) for q in rows] == [5, 4] and [q.answer for q in rows] == ["E", "C"]
    bigbio = {"id": "b1", "question_id": "q1", "document_id": "d1", "question": "Q?", "type": "multiple_choice",
              "choices": ["alpha", "beta", "gamma", "delta"], "context": "", "answer": ["gamma"]}
    got = _load("medqa", _write(tmp_path, "bigbio.jsonl", [bigbio]))[0]
    assert got.answer == "C" and got.options["C"] == "gamma" and got.id == "b1"


def test_medmcqa_zero_based_cop(tmp_path):
    rows = [dict(MEDMCQA, id=f"m{i}", cop=i) for i in range(4)]
    assert [q.answer for q in _load("medmcqa", _write(tmp_path, "m.jsonl", rows))] == list("ABCD")


def test_medmcqa_refuses_one_based_hidden_and_out_of_range_labels(tmp_path):
    one_based = [dict(MEDMCQA, cop=c) for c in (1, 2, 4, 3)]
    with pytest.raises(ValueError, match=r"row 3: cop=4 .*numbers options 1-4"):
        load_benchmark("medmcqa", _write(tmp_path, "one.jsonl", one_based))
    no_zero = [dict(MEDMCQA, cop=1 + i % 3) for i in range(20)]  # 1-based without a 4 in it
    with pytest.raises(ValueError, match="no row has cop=0 in 20 rows: the labels look 1-based"):
        load_benchmark("medmcqa", _write(tmp_path, "nozero.jsonl", no_zero))
    hidden = [dict(MEDMCQA, cop=-1)] * 3
    with pytest.raises(ValueError, match="hides its labels"):
        load_benchmark("medmcqa", _write(tmp_path, "test.jsonl", hidden))
    with pytest.raises(ValueError, match=r"row 2: cop=7 is not an option index 0-3"):
        load_benchmark("medmcqa", _write(tmp_path, "junk.jsonl", [MEDMCQA, dict(MEDMCQA, cop=7)]))


def test_pubmedqa_pqa_labeled_and_authors_ori_pqal(tmp_path):
    got = _load("pubmedqa", _write(tmp_path, "pqa_labeled.jsonl", [PQA_LABELED]))[0]
    assert got.answer == "C" and got.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert got.question.startswith("Abstract text. More.") and got.question.endswith("Does X cause Y?")
    assert got.id == "21645374"
    ori = {"21645374": {"QUESTION": "Does X cause Y?", "CONTEXTS": ["Abstract text."], "LABELS": ["BACKGROUND"],
                        "MESHES": [], "YEAR": "2011", "reasoning_required_pred": "no",
                        "reasoning_free_pred": "no", "final_decision": "no", "LONG_ANSWER": "No."},
           "16418930": {"QUESTION": "Is A B?", "CONTEXTS": ["C."], "final_decision": "yes"}}
    path = tmp_path / "ori_pqal.json"
    path.write_text(json.dumps(ori))
    got = _load("pubmedqa", str(path))
    assert [(q.id, q.answer) for q in got] == [("21645374", "B"), ("16418930", "A")]
    unlabeled = {k: v for k, v in PQA_LABELED.items() if k not in ("final_decision",)}
    with pytest.raises(ValueError, match="not a labelled PubMedQA file"):
        load_benchmark("pubmedqa", _write(tmp_path, "pqa_unlabeled.jsonl", [unlabeled]))


def test_mmlu_pro_medical_categories(tmp_path):
    rows = [MMLU_PRO, dict(MMLU_PRO, category="law"), dict(MMLU_PRO, category="biology", options=list("abcd"),
                                                            answer="B"), MMLU_PRO]
    path = _write(tmp_path, "mmlu_pro.jsonl", rows)
    questions, report = load_benchmark("mmlu_pro_medical", path)
    assert len(questions) == 2 and questions[0].answer == "J" and len(questions[0].options) == 10
    assert report.num_other_category == 2
    assert len(_load("mmlu_pro_medical", path, mmlu_pro_categories=("health", "biology"))) == 3
    with pytest.raises(ValueError, match=r"no 'category' column"):
        load_benchmark("mmlu_pro_medical", _write(tmp_path, "nocat.jsonl", [{k: v for k, v in MMLU_PRO.items()
                                                                             if k != "category"}]))
    with pytest.raises(ValueError, match=r"law.jsonl: no row has an MMLU-Pro category in \['health'\]"):
        load_benchmark("mmlu_pro_medical", _write(tmp_path, "law.jsonl", [dict(MMLU_PRO, category="law")]))


def test_bad_rows_are_counted_and_skipped_up_to_the_threshold(tmp_path):
    rows = [MEDQA_US4] * 9 + [dict(MEDQA_US4, answer_idx="F")]
    questions, report = load_benchmark("medqa", _write(tmp_path, "m.jsonl", rows), max_bad_fraction=0.1)
    assert len(questions) == 9 and report.bad_rows[0][0] == 9 and "answer: 'F'" in report.bad_rows[0][1]
    with pytest.raises(ValueError, match=r"1 of 10 rows are bad, more than max_bad_fraction=0.05"):
        load_benchmark("medqa", _write(tmp_path, "m.jsonl", rows), max_bad_fraction=0.05)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(MEDQA_US4) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl: line 2 is not JSON"):
        load_benchmark("medqa", str(broken))
    with pytest.raises(FileNotFoundError, match=r"data/medqa_tset.jsonl: no such file"):
        load_benchmark("medqa", "data/medqa_tset.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no rows"):
        load_benchmark("medqa", str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="allowed: medqa"):
        load_benchmark("medqa_v2", str(broken))


# --- prompt, extraction, scoring --------------------------------------------------------------


def test_b2_prompt_names_the_questions_letters():
    from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT, grpo_system_prompt_for_letters

    three = grpo_system_prompt_for_letters("ABC")
    assert "(where X is a single letter: A, B or C)" in three
    assert "A, B, C, D, E, F, G, H, I or J)" in grpo_system_prompt_for_letters("ABCDEFGHIJ")
    assert grpo_system_prompt_for_letters("ABCDE") == GRPO_SYSTEM_PROMPT  # five options: the paper's text
    assert three.replace("A, B or C", "A, B, C, D or E") == GRPO_SYSTEM_PROMPT


def test_answer_is_the_last_box_after_the_reasoning_block():
    from gazal_nemo.eval.prompting import EvalPrompt
    from gazal_nemo.eval.run import score_completion

    prompt = EvalPrompt(prompt_id="medqa/1/p0", benchmark="medqa", question_id="1", permutation=0, shift=0,
                        options_order=tuple("ABCD"), option_letters=tuple("ABCD"), gold="B", gold_original="B",
                        prompt_ids=[1])
    cases = {"<think>maybe \\boxed{A}</think> so \\boxed{B}.": ("B", "B"),
             "<think>\\boxed{A}</think> no box": (None, "A"),
             "<think>still thinking \\boxed{C}": (None, "C"),  # cut mid-reasoning: no answer
             "plain \\boxed{D}": ("D", "D"), "\\boxed{F}": (None, None)}  # F is not an option
    for text, (final, anywhere) in cases.items():
        assert score_completion(prompt, text, keep_reasoning=False) == final, text
        assert score_completion(prompt, text, keep_reasoning=True) == anywhere, text


def test_wilson_interval_matches_reference_values():
    from gazal_nemo.eval.scoring import wilson_interval

    low, high = wilson_interval(8, 10)  # the textbook example (statsmodels proportion_confint method="wilson")
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    z, k, n = 1.959963984540054, 871, 1000
    p = k / n  # the closed form, written out independently
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def _record(qid, correct, extracted, *, permutation=0, gold="A", tokens=10, truncated=False, benchmark="medqa"):
    return {"benchmark": benchmark, "question_id": qid, "permutation": permutation, "sample": 0,
            "gold": gold, "extracted": extracted, "correct": correct, "tokens": tokens, "truncated": truncated,
            "seconds": 0.5}


def test_scores_match_a_hand_computation():
    from gazal_nemo.eval.scoring import summarise

    records = [_record("1", True, "A"), _record("2", False, "B"), _record("3", False, None, truncated=True,
                                                                              tokens=40),
               _record("4", True, "A"), _record("5", False, None)]
    row = summarise(records, ["medqa"])["medqa"]
    assert (row["records"], row["correct"], row["accuracy"]) == (5, 2, 0.4)  # failures count as wrong
    assert row["extraction_failure_rate"] == 0.4 and row["truncation_rate"] == 0.2
    assert row["mean_completion_tokens"] == (10 + 10 + 40 + 10 + 10) / 5
    assert row["questions_per_s"] == 5 / 2.5
    assert "consistent_accuracy" not in row


def test_permutations_shift_options_and_consistency_counts_all_orders(tiny_hf_dir):
    from transformers import AutoTokenizer

    from gazal_nemo.eval.loaders import Question
    from gazal_nemo.eval.prompting import build_prompts, cyclic_shift, permutation_shifts
    from gazal_nemo.eval.scoring import summarise

    options = {"A": "w", "B": "x", "C": "y", "D": "z"}
    shifted, gold, order = cyclic_shift(options, "B", 1)
    assert shifted == {"A": "x", "B": "y", "C": "z", "D": "w"} and gold == "A" and order == ("B", "C", "D", "A")
    shifts = permutation_shifts("q7", 4, 3, seed=0)
    assert shifts[0] == 0 and len(set(shifts)) == 3 and shifts == permutation_shifts("q7", 4, 3, seed=0)
    assert sorted(permutation_shifts("q7", 4, 9, seed=0)) == [0, 1, 2, 3]

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    question = Question(id="q7", question="Which?", options=options, answer="B")
    prompts = build_prompts("medqa", [question], tokenizer, system_prompt="", num_permutations=4)
    assert [p.prompt_id for p in prompts] == [f"medqa/q7/p{i}" for i in range(4)]
    assert sorted(p.gold for p in prompts) == list("ABCD")  # the gold moves through every position
    for p in prompts:  # the shown gold letter carries the gold text
        assert options[p.options_order[p.option_letters.index(p.gold)]] == "x"
        assert f"{p.gold}. x" in tokenizer.decode(p.prompt_ids)

    # q1 right in every order; q2 right only when its gold is shown at A (position bias).
    records = [_record("q1", True, "A", permutation=i, gold=g) for i, g in enumerate("ABCD")]
    records += [_record("q2", g == "A", "A", permutation=i, gold=g) for i, g in enumerate("BCDA")]
    row = summarise(records, ["medqa"])["medqa"]
    assert row["accuracy"] == 0.5 and row["consistent_accuracy"] == 0.5
    assert row["mean_accuracy_over_permutations"] == (1.0 + 0.25) / 2
    assert row["accuracy_by_gold_position"] == {"A": 1.0, "B": 0.5, "C": 0.5, "D": 0.5}


# --- the command -------------------------------------------------------------------------------


def _gazal(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_eval_cli_multi_benchmark_on_tiny_model(tiny_hf_dir, tmp_path):
    medqa = _write(tmp_path, "medqa.jsonl", [dict(MEDQA_US4, question=f"Q{i}?") for i in range(3)])
    pubmedqa = _write(tmp_path, "pubmedqa.jsonl", [dict(PQA_LABELED, pubid=i) for i in range(2)])
    out = tmp_path / "eval"
    proc = _gazal("eval", "--model", str(tiny_hf_dir), "--engine", "hf", "--benchmarks", "medqa,pubmedqa",
                  "--data", f"{medqa},{pubmedqa}", "--max-new-tokens", "6", "--system-prompt", "Answer.",
                  "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["medqa"]["records"] == 3 and results["pubmedqa"]["records"] == 2
    # A random tiny model never writes \boxed{X}: every answer is an extraction failure, none correct.
    assert results["medqa"]["extraction_failure_rate"] == 1.0 and results["medqa"]["accuracy"] == 0.0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in lines] == ["medqa/0/p0", "medqa/1/p0", "medqa/2/p0", "pubmedqa/0/p0",
                                                "pubmedqa/1/p0"]
    assert set(lines[0]) >= {"options_order", "completion", "extracted", "gold", "correct", "tokens", "truncated"}
    table = (out / "results.md").read_text()
    assert "| medqa | 3 | 0.0 [0.0, 56.1] |" in table and "87.1" in table and "84.4" in table


def test_eval_cli_user_mistakes_are_one_line_errors(tiny_hf_dir, tmp_path, capsys):
    from gazal_nemo.cli import main

    medqa = _write(tmp_path, "medqa.jsonl", [MEDQA_US4])
    cases = [
        (["--model", str(tmp_path / "no_such_model"), "--benchmarks", "medqa", "--data", medqa], "no such folder"),
        (["--model", str(tiny_hf_dir), "--benchmarks", "medqa", "--data", "medqa_tset.jsonl"], "no such file"),
        (["--model", str(tiny_hf_dir), "--benchmarks", "medqa,pubmedqa", "--data", medqa], "one per benchmark"),
        (["--model", str(tiny_hf_dir), "--benchmarks", "medqa", "--data", medqa, "--top-p", "0"], "--top-p=0.0"),
    ]
    for args, message in cases:  # in-process (hf engine: no process group is started here)
        assert main(["eval", *args, "--engine", "hf", "--out", str(tmp_path / "eval")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.startswith("gazal eval: error:") and err.count("\n") == 1, (args, err)


def test_dry_run_tells_model_kinds_apart_and_checks_the_layout(tiny_hf_dir, tmp_path, capsys):
    from gazal_nemo.cli import main

    medqa = _write(tmp_path, "medqa.jsonl", [MEDQA_US4] * 2)
    step = tmp_path / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_hf_dir), "r": 4,
                                                             "lora_alpha": 8}))
    common = ["eval", "--benchmarks", "medqa", "--data", medqa, "--out", str(tmp_path / "eval"), "--dry-run"]
    for model, kind in ((tiny_hf_dir, "hf"), (adapter, "adapter")):
        assert main(common + ["--model", str(model)]) == 0
        assert f"eval dry run OK: {kind} model" in capsys.readouterr().out
    assert not (tmp_path / "eval").exists()  # a dry run writes nothing
    # A step folder (trainer_state.json) is taken for a step checkpoint, and an unfinished
    # one is refused by name (complete ones: the demo evaluates its GRPO checkpoints).
    assert main(common + ["--model", str(step)]) == 2
    assert f"{step}: step checkpoint is not complete" in capsys.readouterr().err
    assert main(common + ["--model", str(tiny_hf_dir), "--tp", "2"]) == 2
    assert "--tp 2 but 1 processes" in capsys.readouterr().err
    assert main(common + ["--model", str(tiny_hf_dir), "--engine", "hf", "--tp", "2"]) == 2
    assert "--engine hf runs on one device" in capsys.readouterr().err
