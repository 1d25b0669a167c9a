"""Accuracy on the paper's Table 2 benchmarks (MedQA, MedMCQA, PubMedQA, MMLU-Pro medical) in
one command, with the paper's numbers beside ours. --model is a HF folder or hub id, a PEFT
adapter folder (base from --base or the adapter's config), a megatron checkpoint or a stage
step checkpoint. Writes <out>/predictions.jsonl as it goes (rerun the same command to resume),
then <out>/results.md and results.json. TP > 1: torchrun --nproc-per-node N -m gazal_nemo.cli
eval --tp N ... (engine megatron or vllm). See docs/EVAL.md."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    from gazal_nemo.eval.loaders import MMLU_PRO_MEDICAL_CATEGORIES
    from gazal_nemo.inference.registry import STANDALONE_ENGINE_NAMES

    parser.add_argument("--model", required=True,
                        help="HF folder or hub id, PEFT adapter folder, megatron checkpoint, or step checkpoint")
    parser.add_argument("--base", default=None, help="base model of an adapter (default: its base_model_name_or_path)")
    parser.add_argument("--benchmarks", "--benchmark", dest="benchmarks", required=True,
                        help="comma-separated: medqa,medmcqa,pubmedqa,mmlu_pro_medical")
    parser.add_argument("--data", required=True,
                        help="comma-separated, one per benchmark in the same order: .json/.jsonl/.parquet file "
                             "or hub dataset id (owner/name[:config], e.g. qiaojin/PubMedQA:pqa_labeled)")
    parser.add_argument("--split", default="test", help="split of hub datasets (default test)")
    parser.add_argument("--limit", type=int, default=None, help="first N questions of each benchmark")
    parser.add_argument("--out", default="runs/eval", help="output folder (default runs/eval); reruns resume it")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing evaluation in --out")
    parser.add_argument("--engine", default="megatron", choices=STANDALONE_ENGINE_NAMES,
                        help="megatron (KV cache, TP; default), hf (transformers generate), vllm (if installed)")
    parser.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: number of processes)")
    decoding = parser.add_argument_group("decoding (default greedy, one answer per question)")
    decoding.add_argument("--max-new-tokens", type=int, default=4096, help="completion budget (default 4096)")
    decoding.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    decoding.add_argument("--top-k", type=int, default=20, help="sampling only (default 20; 0 = off)")
    decoding.add_argument("--top-p", type=float, default=0.95, help="sampling only (default 0.95)")
    decoding.add_argument("--seed", type=int, default=0, help="sampling and permutation seed (default 0)")
    decoding.add_argument("--num-samples", type=int, default=1, help="answers per question (needs --temperature)")
    decoding.add_argument("--batch-size", type=int, default=16, help="prompts per engine call (default 16)")
    prompting = parser.add_argument_group("prompt and scoring")
    prompting.add_argument("--system-prompt", default=None,
                           help="system prompt, verbatim (default: Appendix B.2 naming the question's letters; "
                                "'' for none)")
    prompting.add_argument("--keep-reasoning", action="store_true",
                           help="take the last \\boxed{X} anywhere, inside <think> too (default: after </think>, as the GRPO reward)")
    prompting.add_argument("--permutations", type=int, default=1,
                           help="ask each question in K option orders (cyclic shifts) for permutation consistency")
    prompting.add_argument("--mmlu-pro-categories", default=",".join(MMLU_PRO_MEDICAL_CATEGORIES),
                           help="MMLU-Pro categories counted as medical (default: health, as lm-eval mmlu_pro_health)")
    prompting.add_argument("--max-bad-fraction", type=float, default=0.01,
                           help="share of broken rows skipped before a file is refused (default 0.01)")
    parser.add_argument("--title", default=None, help="heading of results.md (default: the model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the data files, the model reference and the TP layout for this launch; "
                             "load no weights")


def split_list(value: str, flag: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{flag}: empty")
    return items


def _load_all(args, benchmarks: list[str], data: list[str], categories: list[str]) -> dict:
    from gazal_nemo.eval.loaders import load_benchmark

    questions = {}
    for name, path in zip(benchmarks, data):
        questions[name], report = load_benchmark(name, path, split=args.split, limit=args.limit,
                                                 max_bad_fraction=args.max_bad_fraction,
                                                 mmlu_pro_categories=categories)
        _print0(report.summary())
    return questions


def _print0(text: str) -> None:
    from gazal_nemo.inference.source import is_rank0

    if is_rank0():
        print(text, flush=True)


def _start_process_group(tp: int) -> None:
    """The megatron engine's group comes up first, so a step checkpoint is exported once (rank 0)."""
    from gazal_nemo.parallel import init_parallel, launch_env

    if launch_env().world_size != tp:
        raise ValueError(f"--tp {tp} but {launch_env().world_size} processes; evaluation runs one model replica: "
                         f"launch --tp processes (torchrun --nproc-per-node {tp})")
    init_parallel(tp=tp)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _check_args(args, benchmarks, data) -> None:
    from gazal_nemo.eval.loaders import BENCHMARKS

    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"--benchmarks {','.join(unknown)}: unknown; allowed: {', '.join(BENCHMARKS)}")
    if len(set(benchmarks)) != len(benchmarks):
        raise ValueError(f"--benchmarks {','.join(benchmarks)}: a benchmark appears twice")
    if len(data) != len(benchmarks):
        raise ValueError(f"--data has {len(data)} entries for {len(benchmarks)} benchmarks; give one per benchmark")
    if args.permutations < 1:
        raise ValueError(f"--permutations={args.permutations}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit}: must be >= 1")


def run(args) -> int:
    from gazal_nemo.eval.prompting import build_prompts
    from gazal_nemo.eval.report import markdown_table, write_results
    from gazal_nemo.eval.run import (
        DecodingConfig,
        check_resume,
        prepare_out_dir,
        run_prompts,
        settings_fingerprint,
    )
    from gazal_nemo.eval.scoring import summarise
    from gazal_nemo.inference.registry import (
        StandaloneOptions,
        build_standalone_engine,
        check_standalone_layout,
    )
    from gazal_nemo.inference.source import is_rank0, load_tokenizer, resolve_model
    from gazal_nemo.inference.stopping import stop_token_ids
    from gazal_nemo.parallel import launch_env

    benchmarks, data = split_list(args.benchmarks, "--benchmarks"), split_list(args.data, "--data")
    categories = split_list(args.mmlu_pro_categories, "--mmlu-pro-categories")
    _check_args(args, benchmarks, data)
    decoding = DecodingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, num_samples=args.num_samples,
                              batch_size=args.batch_size)
    questions = _load_all(args, benchmarks, data, categories)  # data errors before any model is loaded
    out_dir = Path(args.out)
    settings = settings_fingerprint(model=args.model, base=args.base, benchmarks=benchmarks, data=data,
                                    decoding=decoding, system_prompt=args.system_prompt,
                                    num_permutations=args.permutations, keep_reasoning=args.keep_reasoning,
                                    limit=args.limit, mmlu_pro_categories=categories)
    tp = args.tp or launch_env().world_size
    check_resume(out_dir, settings, overwrite=args.overwrite)
    if args.engine == "megatron" and not args.dry_run:
        _start_process_group(tp)
    source = resolve_model(args.model, base=args.base, work_dir=out_dir / "model", dry_run=args.dry_run)
    plan = check_standalone_layout(source, engine=args.engine, tp=tp, world_size=launch_env().world_size)
    if args.dry_run:
        total = sum(len(q) for q in questions.values()) * args.permutations * args.num_samples
        _print0(f"eval dry run OK: {plan}; {total} answers to generate into {out_dir}")
        return 0
    tokenizer = load_tokenizer(source)
    stop_ids = stop_token_ids(tokenizer)
    prompts = [p for name in benchmarks for p in build_prompts(
        name, questions[name], tokenizer, system_prompt=args.system_prompt, num_permutations=args.permutations,
        seed=args.seed)]
    engine = build_standalone_engine(args.engine, source, StandaloneOptions(
        tp=tp, work_dir=out_dir / "model", stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
        max_batch_size=args.batch_size, seed=args.seed,
        max_model_len=max((len(p.prompt_ids) for p in prompts), default=0) + args.max_new_tokens))
    writer = is_rank0()
    if writer:
        prepare_out_dir(out_dir, settings, overwrite=args.overwrite)
    _barrier()  # every rank reads the log only after rank 0 has prepared it
    records = run_prompts(prompts, engine, tokenizer, out_dir=out_dir, decoding=decoding, stop_ids=stop_ids,
                          keep_reasoning=args.keep_reasoning, writer=writer)
    if writer:
        results = summarise(records, benchmarks)
        title = args.title or f"{args.model} ({args.engine} engine)"
        json_path, md_path = write_results(out_dir, results, title=title, settings=dict(settings, engine=args.engine))
        print(markdown_table(results, title=title))
        print(f"eval: wrote {md_path}, {json_path} and {out_dir / 'predictions.jsonl'}", flush=True)
    return 0
