"""Contamination check: which benchmark questions (MedQA, MedMCQA, PubMedQA, MMLU-Pro medical)
share word n-grams with training files (SFT sources, GRPO MCQs); lists them with the training
rows involved and can write training files without those rows. See docs/EVAL.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--train", required=True, help="comma-separated training files (.json/.jsonl/.parquet)")
    parser.add_argument("--train-keys", default="question",
                        help="comma-separated text columns of the training rows (default question)")
    parser.add_argument("--benchmarks", required=True, help="comma-separated: medqa,medmcqa,pubmedqa,mmlu_pro_medical")
    parser.add_argument("--data", required=True, help="comma-separated benchmark files or hub ids, one per benchmark")
    parser.add_argument("--split", default="test", help="split of hub datasets (default test)")
    parser.add_argument("--ngram", type=int, default=8, help="n-gram length in words (default 8)")
    parser.add_argument("--min-overlap", type=float, default=0.5,
                        help="share of a question's n-grams found in training that flags it (default 0.5)")
    parser.add_argument("--out", default="runs/decontam", help="report folder (default runs/decontam)")
    parser.add_argument("--write-filtered", action="store_true",
                        help="also write <out>/<train>.decontaminated.jsonl without the overlapping rows")


def run(args) -> int:
    from gazal_nemo.commands.evaluate import split_list
    from gazal_nemo.eval.decontam import find_overlaps, report_markdown, write_filtered
    from gazal_nemo.eval.loaders import BENCHMARKS, load_benchmark

    names, data = split_list(args.benchmarks, "--benchmarks"), split_list(args.data, "--data")
    train, keys = split_list(args.train, "--train"), split_list(args.train_keys, "--train-keys")
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown or len(names) != len(data):
        raise ValueError(f"--benchmarks {args.benchmarks} / --data: give known benchmarks "
                         f"({', '.join(BENCHMARKS)}) and one data entry each")
    missing = [p for p in train if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"--train {missing[0]}: no such file")
    benchmarks = {name: load_benchmark(name, path, split=args.split, max_bad_fraction=1.0)[0]
                  for name, path in zip(names, data)}
    flagged, num_rows = find_overlaps(benchmarks, train, keys=keys, n=args.ngram, min_overlap=args.min_overlap)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(flagged, benchmarks, num_rows, n=args.ngram, min_overlap=args.min_overlap)
    payload = {"ngram": args.ngram, "min_overlap": args.min_overlap, "training_rows": num_rows,
               "questions": {name: len(q) for name, q in benchmarks.items()},
               "contaminated": [asdict(o) for o in flagged]}
    for name, text in (("decontam.json", json.dumps(payload, indent=2) + "\n"), ("decontam.md", markdown)):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        tmp.replace(out / name)
    print(markdown)
    if args.write_filtered:
        for path in write_filtered(train, flagged, out):
            print(f"decontam: wrote {path}", flush=True)
    print(f"decontam: {len(flagged)} contaminated questions; report in {out / 'decontam.md'}", flush=True)
    return 0
