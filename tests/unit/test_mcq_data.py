"""MCQ prompt data: row checks, loading json/jsonl/parquet with `datasets`, chat rendering
against the tokenizer's own template, the seeded subset, the length cap, and the synthetic task."""

import json

import pytest

from gazal_nemo.tasks.mcq import (
    SYNTHETIC_WORDS,
    MCQDataConfig,
    accuracy_reward,
    build_mcq_prompts,
    load_mcq_prompts,
    make_synthetic_mcq_rows,
    mcq_messages,
    parse_mcq_row,
)
from gazal_nemo.testing.tiny import make_tiny_tokenizer, write_jsonl

SHORT_SYSTEM = "Answer with \\boxed{X}."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("mcq_tok"))


def _cfg(path="rows.jsonl", **overrides):
    fields = dict(path=str(path), subset_fraction=1.0, system_prompt=SHORT_SYSTEM, max_bad_fraction=0.5)
    return MCQDataConfig(**(fields | overrides))


ROWS = [
    {"question": "Chest pain and ST elevation: diagnosis?", "options": {"A": "GERD", "B": "STEMI", "C": "Panic"},
     "answer": "B"},
    {"question": "First drug?", "options": ["Aspirin", "Heparin", "Morphine", "Oxygen"], "answer": "a"},
    {"question": "Lead group?", "options": {"D": "aVF", "A": "V1", "B": "I", "C": "aVL", "E": None}, "answer": "(D)"},
]


def test_parse_rows_normalises_letters_and_orders_options():
    question, options, gold = parse_mcq_row(ROWS[2]["question"], ROWS[2]["options"], ROWS[2]["answer"])
    assert (question, gold) == ("Lead group?", "D")
    assert list(options) == ["A", "B", "C", "D"]  # None (a parquet struct's missing letter) dropped
    _, options, gold = parse_mcq_row("q", ROWS[1]["options"], "a")
    assert options == {"A": "Aspirin", "B": "Heparin", "C": "Morphine", "D": "Oxygen"} and gold == "A"
    _, options, _ = parse_mcq_row("q", json.dumps({"A": "x", "B": "y"}), "B.")
    assert options == {"A": "x", "B": "y"}


@pytest.mark.parametrize("row, reason", [
    (dict(question="", options=["x", "y"], answer="A"), "question"),
    (dict(question=None, options=["x", "y"], answer="A"), "question"),
    (dict(question="q", options=None, answer="A"), "options"),
    (dict(question="q", options=["only one"], answer="A"), "options"),
    (dict(question="q", options={"A": "x", "AB": "y"}, answer="A"), "options"),
    (dict(question="q", options=["x", ""], answer="A"), "options"),
    (dict(question="q", options="not json", answer="A"), "options"),
    (dict(question="q", options=["x", "y"], answer="C"), "answer"),
    (dict(question="q", options=["x", "y"], answer="Aspirin"), "answer"),
    (dict(question="q", options=["x", "y"], answer=None), "answer"),
])
def test_bad_rows_say_why(row, reason):
    from gazal_nemo.data.sources import BadRowError

    with pytest.raises(BadRowError, match=f"^{reason}"):
        parse_mcq_row(row["question"], row["options"], row["answer"])


def test_prompt_is_the_tokenizers_chat_template_with_generation_prompt(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    prompts, report = load_mcq_prompts(_cfg(path), tokenizer)
    assert report.num_prompts == 3 and report.num_bad == 0
    by_row = {p.row: p for p in prompts}
    first = by_row[0]
    messages = [{"role": "system", "content": SHORT_SYSTEM},
                {"role": "user", "content": "Chest pain and ST elevation: diagnosis?\n\nA. GERD\nB. STEMI\nC. Panic"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert first.prompt == expected
    assert first.prompt.endswith("<|im_start|>assistant\n")
    assert first.prompt_ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert (first.gold_letter, first.option_letters) == ("B", ("A", "B", "C"))
    assert (by_row[2].gold_letter, by_row[2].option_letters) == ("D", ("A", "B", "C", "D"))
    assert mcq_messages("q", {"A": "x", "B": "y"}, "")[0]["role"] == "user"  # '' sends no system message


def test_default_system_prompt_is_the_papers_b2(tokenizer, tmp_path):
    from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT

    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:1])
    prompts, _ = load_mcq_prompts(_cfg(path, system_prompt=None, max_prompt_length=100_000), tokenizer)
    assert GRPO_SYSTEM_PROMPT in prompts[0].prompt


@pytest.mark.parametrize("suffix", ["json", "parquet"])
def test_json_and_parquet_with_column_mapping(tokenizer, tmp_path, suffix):
    renamed = [{"stem": r["question"], "choices": r["options"], "key": r["answer"]} for r in ROWS]
    path = tmp_path / f"rows.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(renamed))
    else:
        from datasets import Dataset

        # Lists and dicts cannot share a parquet column: store every row's options as {letter: text}.
        for row in renamed:
            if isinstance(row["choices"], list):
                row["choices"] = dict(zip("ABCD", row["choices"]))
        Dataset.from_list(renamed).to_parquet(str(path))
    cfg = _cfg(path, question_key="stem", options_key="choices", answer_key="key")
    prompts, report = load_mcq_prompts(cfg, tokenizer)
    assert report.num_prompts == 3
    assert sorted((p.row, p.gold_letter, len(p.option_letters)) for p in prompts) == [(0, "B", 3), (1, "A", 4), (2, "D", 4)]


def test_missing_column_and_missing_file_are_named(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    with pytest.raises(ValueError, match="data.question_key='stem'"):
        load_mcq_prompts(_cfg(path, question_key="stem"), tokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        load_mcq_prompts(_cfg(tmp_path / "nope.jsonl"), tokenizer)


def test_bad_rows_are_counted_by_index_and_thresholded(tokenizer):
    rows = make_synthetic_mcq_rows(20, seed=1)
    rows[3]["answer"] = "Z"
    rows[11]["question"] = ""
    rows[17]["options"] = None
    prompts, report = build_mcq_prompts(rows, _cfg(max_bad_fraction=0.2), tokenizer)
    assert report.num_bad == 3 and [bad.row for bad in report.bad_rows] == [3, 11, 17]
    assert report.bad_rows[0].reason.startswith("answer")
    assert len(prompts) == 17 and {3, 11, 17}.isdisjoint(p.row for p in prompts)
    assert "bad row 4: answer" in report.summary()  # reports count rows from 1
    with pytest.raises(ValueError, match=r"3 of 20 rows are bad .*grpo\.data\.max_bad_fraction=0.1.*first: row 4:"):
        build_mcq_prompts(rows, _cfg(max_bad_fraction=0.1), tokenizer)


def test_subset_is_seeded_and_of_the_right_size(tokenizer):
    rows = make_synthetic_mcq_rows(200, seed=2)
    rows[5]["answer"] = "Q"  # bad rows are never drawn
    cfg = _cfg(subset_fraction=0.1, seed=3047)
    first, report = build_mcq_prompts(rows, cfg, tokenizer)
    again, _ = build_mcq_prompts(rows, cfg, tokenizer)
    other, _ = build_mcq_prompts(rows, _cfg(subset_fraction=0.1, seed=7), tokenizer)
    assert report.num_selected == len(first) == round(0.1 * 199)
    assert [p.row for p in first] == [p.row for p in again]
    assert [p.row for p in first] != [p.row for p in other]
    assert 5 not in {p.row for p in first}
    assert [p.row for p in first] != sorted(p.row for p in first)  # shuffled order


def test_prompt_length_cap_drops_and_counts(tokenizer):
    rows = [dict(r) for r in make_synthetic_mcq_rows(6, seed=3)]
    for row in rows[:2]:
        row["question"] = "Consider differential diagnoses by system. " * 20 + row["question"]
    lengths = [len(p.prompt_ids) for p in build_mcq_prompts(rows, _cfg(), tokenizer)[0]]
    cap = sorted(lengths)[3]  # the 4 short prompts fit, the 2 long ones do not
    prompts, report = build_mcq_prompts(rows, _cfg(max_prompt_length=cap), tokenizer)
    assert report.num_too_long == 2 and len(prompts) == 4
    assert all(len(p.prompt_ids) <= cap for p in prompts)
    assert {p.row for p in prompts} == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="no usable prompts"):
        build_mcq_prompts(rows, _cfg(max_prompt_length=3), tokenizer)


def test_synthetic_task_is_verifiable_and_short(tokenizer):
    rows = make_synthetic_mcq_rows(50, seed=4, num_options=5)
    assert rows == make_synthetic_mcq_rows(50, seed=4, num_options=5)
    prompts, report = build_mcq_prompts(rows, _cfg(), tokenizer)
    assert report.num_bad == 0 and len(prompts) == 50
    for row, prompt in zip(rows, sorted(prompts, key=lambda p: p.row)):
        word = row["question"].removeprefix("Which option is the word ").removesuffix("?")
        assert word in SYNTHETIC_WORDS
        assert row["options"][row["answer"]] == word
        assert list(row["options"].values()).count(word) == 1
        assert prompt.option_letters == ("A", "B", "C", "D", "E")
        assert accuracy_reward(completion=f"\\boxed{{{row['answer']}}}", num_tokens=4, gold_letter=prompt.gold_letter,
                               option_letters=prompt.option_letters, truncated=False) == 1.0
    assert max(len(p.prompt_ids) for p in prompts) < 96
    assert len({row["answer"] for row in rows}) == 5  # the gold position varies


def test_config_validation():
    with pytest.raises(ValueError, match=r"grpo\.data\.subset_fraction"):
        MCQDataConfig(path="x.jsonl", subset_fraction=0.0)
    with pytest.raises(ValueError, match=r"grpo\.data\.max_prompt_length"):
        MCQDataConfig(path="x.jsonl", max_prompt_length=0)
    cfg = MCQDataConfig(path="x.jsonl")
    assert (cfg.max_prompt_length, cfg.subset_fraction) == (3072, 0.1)
