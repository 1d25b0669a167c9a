"""Contamination check on files with planted overlaps: a copied question and a lightly
edited one are found with the training rows that hold them; shared boilerplate and
unrelated rows are not; the filtered training file drops exactly the planted rows."""

import json

from gazal_nemo.cli import main
from gazal_nemo.eval.decontam import find_overlaps, ngrams, write_filtered
from gazal_nemo.eval.loaders import load_benchmark
from gazal_nemo.testing.tiny import write_jsonl

OPTIONS = {"A": "a", "B": "b", "C": "c", "D": "d"}
BOILERPLATE = "Which of the following is the most likely diagnosis?"
QUESTIONS = [
    "A 65-year-old man presents with crushing chest pain radiating to the left arm and diaphoresis for two hours. "
    + BOILERPLATE,
    "A 23-year-old woman has fatigue, pallor and koilonychia after months of heavy menstrual bleeding and a low "
    "ferritin level. " + BOILERPLATE,
    "A 4-year-old boy has a barking cough, inspiratory stridor and a steeple sign on the neck radiograph. "
    + BOILERPLATE,
    "Which enzyme is deficient in classic phenylketonuria?",
]


def _files(tmp_path):
    bench = write_jsonl(tmp_path / "medqa_test.jsonl",
                        [{"id": f"q{i}", "question": q, "options": OPTIONS, "answer_idx": "A"}
                         for i, q in enumerate(QUESTIONS)])
    edited = QUESTIONS[1].replace("23-year-old", "25-year-old").replace("pallor", "pale skin")
    train = [
        {"question": "A 70-year-old woman has a painless jaundice and weight loss. " + BOILERPLATE, "answer": "x"},
        {"question": QUESTIONS[0], "answer": "x"},  # planted: verbatim copy
        {"question": "Unrelated: the mechanism of action of aspirin on platelets.", "answer": "x"},
        {"question": "Revise this case. " + edited, "answer": "x"},  # planted: lightly edited copy
        {"question": "Which enzyme is deficient in classic galactosemia?", "answer": "x"},  # short, differs
    ]
    return str(bench), str(write_jsonl(tmp_path / "sft.jsonl", train))


def test_planted_overlaps_are_found_and_filtered(tmp_path):
    bench, train = _files(tmp_path)
    questions = {"medqa": load_benchmark("medqa", bench)[0]}
    flagged, num_rows = find_overlaps(questions, [train], keys=["question"], n=8, min_overlap=0.5)
    assert num_rows == {train: 5}
    assert [(o.question_id, o.training_rows) for o in flagged] == [("q0", [(train, 1)]), ("q1", [(train, 3)])]
    assert flagged[0].overlap == 1.0 and 0.5 <= flagged[1].overlap < 1.0
    written = write_filtered([train], flagged, tmp_path / "out")
    kept = [json.loads(x)["question"] for x in written[0].read_text().splitlines()]
    assert len(kept) == 3 and QUESTIONS[0] not in kept and not any("Revise this case" in k for k in kept)
    # "Any shared 8-gram" would also flag q2 through the boilerplate alone; the share rule does not.
    assert ngrams(QUESTIONS[2], 8) & ngrams(QUESTIONS[0], 8)


def test_decontam_command_writes_report_and_filtered_file(tmp_path, capsys):
    bench, train = _files(tmp_path)
    out = tmp_path / "report"
    assert main(["decontam", "--train", train, "--benchmarks", "medqa", "--data", bench, "--out", str(out),
                 "--write-filtered"]) == 0
    report = json.loads((out / "decontam.json").read_text())
    assert [o["question_id"] for o in report["contaminated"]] == ["q0", "q1"]
    assert "| medqa | 4 | 2 | 50.0 |" in (out / "decontam.md").read_text()
    assert len((out / "sft.decontaminated.jsonl").read_text().splitlines()) == 3
    assert main(["decontam", "--train", train, "--train-keys", "prompt", "--benchmarks", "medqa",
                 "--data", bench, "--out", str(out)]) == 2
    assert "none of the text keys ['prompt']" in capsys.readouterr().err
