"""Evaluate a Hugging Face model folder (e.g. an export of gazal-nemo) on MedQA, MedMCQA,
PubMedQA or MMLU-Pro (medical) rows from a local file or hub id; prints and writes accuracy."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    from gazal_nemo.eval.benchmarks import BENCHMARKS

    parser.add_argument("--model", required=True, help="Hugging Face model folder (or hub id)")
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--data", required=True, help="benchmark file (.json/.jsonl/.parquet) or hub dataset id")
    parser.add_argument("--split", default="test", help="split when --data is a hub id (default test)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def run(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gazal_nemo.eval.benchmarks import load_benchmark
    from gazal_nemo.eval.run import evaluate_rows
    from gazal_nemo.hub import resolve_model_dir

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError("--max-new-tokens and --batch-size must be >= 1")
    rows = load_benchmark(args.benchmark, args.data, split=args.split, limit=args.limit)
    model_dir = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    result = evaluate_rows(model, tokenizer, rows, benchmark=args.benchmark, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, batch_size=args.batch_size)
    summary = {"benchmark": result.benchmark, "accuracy": result.accuracy, "questions": result.num_questions,
               "correct": result.num_correct, "unanswered": result.num_unanswered, "seconds": round(result.seconds, 1)}
    print(json.dumps(summary))
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(path)
    return 0
