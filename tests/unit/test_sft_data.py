"""SFT data: prompts, chat rendering and loss masks, local sources, mixing, bad rows."""

from pathlib import Path

import numpy as np
import pytest

from gazal_nemo.data.config import DataSourceConfig, SFTDataConfig
from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT, SFT_SYSTEM_PROMPT
from gazal_nemo.data.sft import (
    IGNORE_INDEX,
    build_sft_dataset,
    build_sft_documents,
    row_messages,
    tokenize_chat,
)
from gazal_nemo.data.sources import load_mixed_rows, load_source
from gazal_nemo.testing.tiny import make_tiny_tokenizer, write_jsonl

PAPER = Path("/work/shared/seeds/000_ff4b775be55dfd7d.txt")
SYSTEM = "Think first."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _medreason_row(i, **overrides):
    row = {
        "question": f"Patient {i} has chest pain. Diagnosis?",
        "options": ["STEMI", "NSTEMI", "Angina"],
        "answer": "A. STEMI",
        "reasoning": f"ST elevation in {i} leads.",
    }
    row.update(overrides)
    return row


def _chat_row(i):
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"<think>\nstep {i}\n</think>\n\nAnswer {i}"},
        ]
    }


def _chatml(messages, generation_prompt=False):
    """ChatML written out by hand: the independent reference for the tokenizer's template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- prompts -----------------------------------------------------------------------------


@pytest.mark.skipif(not PAPER.exists(), reason="paper text not available")
def test_system_prompts_are_verbatim_from_the_paper():
    lines = PAPER.read_text().split("\n")
    b1, b2 = lines.index("B.1 SFT System Prompt"), lines.index("B.2 GRPO System Prompt")
    assert SFT_SYSTEM_PROMPT == "\n".join(lines[b1 + 1 : b2]).strip("\n")
    assert GRPO_SYSTEM_PROMPT == "\n".join(lines[b2 + 1 :]).strip("\n")


def test_system_prompt_content():
    assert SFT_SYSTEM_PROMPT.startswith("When solving complex medical problems, follow this specific format:")
    assert "<think></think>" in SFT_SYSTEM_PROMPT and "10 words" in SFT_SYSTEM_PROMPT
    assert GRPO_SYSTEM_PROMPT.startswith("You are a medical reasoning AI")
    assert "\\boxed{X}" in GRPO_SYSTEM_PROMPT and "<think></think>" in GRPO_SYSTEM_PROMPT
    assert SFTDataConfig(sources=[DataSourceConfig(path="x.jsonl")]).system_prompt == SFT_SYSTEM_PROMPT


# ---- rendering and masks ----------------------------------------------------------------


def test_medreason_rendering_and_assistant_only_labels(tokenizer):
    row = _medreason_row(1)
    ids, labels = tokenize_chat(row_messages(row, "medreason", SYSTEM), tokenizer)
    user = "Patient 1 has chest pain. Diagnosis?\n\nA. STEMI\nB. NSTEMI\nC. Angina"
    answer = "<think>\nST elevation in 1 leads.\n</think>\n\nA. STEMI"
    prompt = _chatml([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}], True)
    assert ids.tolist() == _ids(tokenizer, prompt + answer + "<|im_end|>\n")
    prompt_len = len(_ids(tokenizer, prompt))
    trained = np.flatnonzero(labels != IGNORE_INDEX)
    # Exactly the answer and its <|im_end|>; not the system/user turns, not the trailing newline.
    assert trained.tolist() == list(
        range(prompt_len, prompt_len + len(_ids(tokenizer, answer + "<|im_end|>")))
    )
    assert (labels[trained] == ids[trained]).all()
    assert tokenizer.decode(ids[trained]) == answer + "<|im_end|>"


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"A": "x", "B": "y"}, "A. x\nB. y"),
        ("Answer Choices:\nA. x\nB. y", "Answer Choices:\nA. x\nB. y"),
        (None, None),
    ],
)
def test_medreason_option_forms(options, expected):
    user = row_messages(_medreason_row(0, options=options), "medreason", SYSTEM)[1]["content"]
    question = "Patient 0 has chest pain. Diagnosis?"
    assert user == (question if expected is None else f"{question}\n\n{expected}")


def test_recipe_system_prompt_replaces_the_rows_and_empty_keeps_it():
    row = {"messages": [{"role": "system", "content": "data prompt"}] + _chat_row(0)["messages"]}
    replaced = row_messages(row, "messages", SYSTEM)
    assert [m["role"] for m in replaced] == ["system", "user", "assistant"]
    assert replaced[0]["content"] == SYSTEM
    assert row_messages(row, "messages", "")[0]["content"] == "data prompt"


def test_multi_turn_trains_only_the_final_answer(tokenizer):
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    ids, labels = tokenize_chat(row_messages({"messages": messages}, "messages", SYSTEM), tokenizer)
    assert tokenizer.decode(ids[labels != IGNORE_INDEX]) == "a2<|im_end|>"


# ---- sources ----------------------------------------------------------------------------


def _write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_both_formats_from_jsonl_and_parquet_with_column_mapping(tmp_path, tokenizer):
    renamed = [
        {"stem": r["question"], "opts": r["options"], "label": r["answer"], "why": r["reasoning"], "extra": 1}
        for r in (_medreason_row(i) for i in range(4))
    ]
    _write_parquet(tmp_path / "med.parquet", renamed)
    write_jsonl(tmp_path / "chat" / "part0.jsonl", [_chat_row(i) for i in range(3)])
    write_jsonl(tmp_path / "chat" / "part1.jsonl", [_chat_row(i) for i in range(3, 5)])
    cfg = SFTDataConfig(
        system_prompt=SYSTEM,
        max_length=512,
        sources=[
            DataSourceConfig(
                path=str(tmp_path / "med.parquet"),
                format="medreason",
                columns={"question": "stem", "options": "opts", "answer": "label", "reasoning": "why"},
            ),
            DataSourceConfig(path=str(tmp_path / "chat")),  # a folder of jsonl files
        ],
    )
    documents, report = build_sft_documents(cfg, tokenizer)
    assert [c.num_rows for c in report.sources] == [4, 5] and report.num_bad == 0
    assert len(documents) == 9
    by_source = {(d.source_index, d.row): d for d in documents}
    med = tokenizer.decode(by_source[(0, 2)].input_ids)
    assert "Patient 2 has chest pain. Diagnosis?\n\nA. STEMI\nB. NSTEMI" in med and "ST elevation in 2" in med
    chat = by_source[(1, 4)]
    assert (
        tokenizer.decode(chat.input_ids[chat.labels != IGNORE_INDEX])
        == "<think>\nstep 4\n</think>\n\nAnswer 4<|im_end|>"
    )


def test_missing_column_and_missing_path_are_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"a.jsonl.*missing column.*reasoning"):
        load_source(DataSourceConfig(path=str(tmp_path / "a.jsonl"), format="medreason"))
    with pytest.raises(ValueError, match="does not exist"):
        load_source(DataSourceConfig(path=str(tmp_path / "nope.jsonl")))


def test_max_rows_reads_the_first_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [_chat_row(i) for i in range(10)])
    dataset = load_source(DataSourceConfig(path=str(tmp_path / "a.jsonl"), max_rows=3))
    assert [r["messages"][0]["content"] for r in dataset] == ["Question 0?", "Question 1?", "Question 2?"]


def test_mixing_is_deterministic_and_follows_weights(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [_chat_row(i) for i in range(40)])
    write_jsonl(tmp_path / "b.jsonl", [_chat_row(i) for i in range(10)])
    sources = [
        DataSourceConfig(path=str(tmp_path / "a.jsonl"), weight=0.25),
        DataSourceConfig(path=str(tmp_path / "b.jsonl"), weight=2.0),
    ]
    mixed = load_mixed_rows(sources, seed=3407)
    assert [(c.num_rows, c.num_drawn) for c in mixed.counts] == [(40, 10), (10, 20)]
    order = mixed.order
    a_rows = order[order[:, 0] == 0, 1]
    b_rows = order[order[:, 0] == 1, 1]
    assert len(a_rows) == 10 and len(set(a_rows.tolist())) == 10  # a seeded quarter, no repeats
    assert sorted(b_rows.tolist()) == sorted(list(range(10)) * 2)  # every row exactly twice
    assert np.array_equal(load_mixed_rows(sources, seed=3407).order, order)
    other = load_mixed_rows(sources, seed=1).order
    assert not np.array_equal(other, order)
    assert (order[:, 0] == 1).any() and (order[:20, 0] == 0).any()  # interleaved, not concatenated


# ---- bad rows ---------------------------------------------------------------------------


def _bad_rows_source(tmp_path, num_good):
    rows = [_medreason_row(i) for i in range(num_good)]
    rows[1] = _medreason_row(1, answer="   ")  # empty answer
    rows[3] = {k: v for k, v in _medreason_row(3).items() if k != "reasoning"} | {"reasoning": None}
    write_jsonl(tmp_path / "med.jsonl", rows)
    chats = [_chat_row(i) for i in range(4)]
    chats[2] = {"messages": [{"role": "doctor", "content": "hi"}, {"role": "assistant", "content": "a"}]}
    write_jsonl(tmp_path / "chat.jsonl", chats)
    return [
        DataSourceConfig(path=str(tmp_path / "med.jsonl"), format="medreason"),
        DataSourceConfig(path=str(tmp_path / "chat.jsonl")),
    ]


def test_bad_rows_are_counted_and_reported_by_source_and_index(tmp_path, tokenizer):
    sources = _bad_rows_source(tmp_path, num_good=12)
    cfg = SFTDataConfig(sources=sources, system_prompt=SYSTEM, max_length=512, max_bad_fraction=0.25)
    dataset, report = build_sft_dataset(cfg, tokenizer)
    found = {(Path(b.source).name, b.row, b.reason.split(":")[0]) for b in report.bad_rows}
    assert found == {
        ("med.jsonl", 1, "empty field"),
        ("med.jsonl", 3, "missing field"),
        ("chat.jsonl", 2, "unknown role"),
    }
    assert report.num_bad == 3 and report.num_documents == 13 and report.num_rows == 16
    assert "bad row 2 of" in report.summary() and "chat.jsonl" in report.summary()
    assert sum(len(b) for b in dataset.bins) == 13


def test_too_many_bad_rows_stop_before_training(tmp_path, tokenizer):
    sources = _bad_rows_source(tmp_path, num_good=12)
    cfg = SFTDataConfig(sources=sources, system_prompt=SYSTEM, max_length=512, max_bad_fraction=0.1)
    with pytest.raises(ValueError, match=r"3 of 16 rows are bad.*max_bad_fraction=0.1(.|\n)*unknown role"):
        build_sft_dataset(cfg, tokenizer)


def test_truncation_policies(tmp_path, tokenizer):
    long_row = _medreason_row(0, reasoning=" ".join(["pathophysiology"] * 200))
    write_jsonl(tmp_path / "med.jsonl", [long_row] + [_medreason_row(i) for i in range(1, 4)])
    source = [DataSourceConfig(path=str(tmp_path / "med.jsonl"), format="medreason")]
    kwargs = dict(sources=source, system_prompt=SYSTEM, max_length=128, max_bad_fraction=0.5, pack=False)
    _, dropped = build_sft_dataset(SFTDataConfig(truncation="drop", **kwargs), tokenizer)
    assert [(b.row, b.reason.split(":")[0]) for b in dropped.bad_rows] == [(0, "too long")]
    documents, truncated = build_sft_documents(SFTDataConfig(truncation="truncate", **kwargs), tokenizer)
    assert truncated.num_bad == 0
    assert max(len(d) for d in documents) == 128


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(truncation="cut"), "truncation"),
        (dict(max_bad_fraction=1.5), "max_bad_fraction"),
        (dict(sources=[]), "sources"),
        (dict(max_length=1), "max_length"),
    ],
)
def test_sft_config_validation(kwargs, key):
    base = dict(sources=[DataSourceConfig(path="x.jsonl")])
    with pytest.raises(ValueError, match=key):
        SFTDataConfig(**(base | kwargs))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(format="alpaca"), "format"),
        (dict(format="medreason", columns={"prompt": "q"}), "columns"),
        (dict(weight=0.0), "weight"),
        (dict(max_rows=0), "max_rows"),
    ],
)
def test_source_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DataSourceConfig(path="x.jsonl", **kwargs)
