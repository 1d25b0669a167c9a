"""Generate the paper's structured clinical-reasoning SFT dataset (section 3.1.1) with a teacher
model: vLLM offline or any OpenAI-compatible endpoint; validated (structure, Chain-of-Draft),
deduplicated, decontaminated, in the `messages` format `gazal sft` reads. See docs/SYNTH.md.

    gazal synth --recipe recipes/synth_structured_medical.yaml generator.model=/models/gemma-3-27b-it
    gazal synth --recipe recipes/synth_structured_medical.yaml --dry-run     # the attribute plan, no generation
    gazal synth --recipe R --finalize       # merge a multi-shard job's chunks (slurm/synth_8xh100.sh does it)

A run resumes where it stopped (kill -9 included): finished chunks are kept, the rest is
generated again. Under Slurm (SLURM_PROCID/SLURM_NTASKS) or with RANK/WORLD_SIZE, each process
generates its shard of the chunks; one process alone also writes the dataset and the report.
Exit status: 0 done (or this shard done), 2 a refusal before generation (recipe, model,
endpoint, output folder, a folder holding another run or held by a live process).
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--recipe", required=True, help="synthesis recipe (recipes/synth_structured_medical.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the recipe, the model or endpoint and the output folder, print the attribute "
                             "plan and the number of generations, and exit")
    parser.add_argument("--finalize", action="store_true",
                        help="only write the dataset, rejects and report from the finished chunks")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (dotted keys)")


def _plan(recipe, *, shard: int, num_shards: int, output_dir: Path) -> list[str]:
    """What this run will do: chunks left, generations to expect, and the attribute plan of every index."""
    from gazal_nemo.synth.attributes import draw_attributes
    from gazal_nemo.synth.chunks import chunk_path, chunk_range, shard_chunks
    from gazal_nemo.synth.report import attribute_rates

    mine = shard_chunks(recipe, shard, num_shards)
    done = [c for c in mine if chunk_path(output_dir, c).is_file()]
    left = sum(len(chunk_range(recipe, c)) for c in mine if c not in done)
    retries = recipe.validation.max_retries
    lines = [f"synth: {recipe.num_examples} examples in {recipe.num_chunks} chunks of {recipe.chunk_size}; "
             f"this process: shard {shard} of {num_shards}, {len(mine)} chunks ({len(done)} done, "
             f"{len(mine) - len(done)} to generate, {left} examples)",
             f"synth: generations expected: {2 * left} (a case and an answer per example); at most "
             f"{2 * left * (1 + retries)} if every attempt were rejected (validation.max_retries={retries}, "
             f"enforce={recipe.validation.enforce})"]
    planned = [draw_attributes(recipe.design, recipe.seed, i).to_json() for i in range(recipe.num_examples)]
    lines += ["synth: attribute plan over all indices (seed "
              f"{recipe.seed}): attribute, cases it applies to, target %, planned %, count, binomial interval (99% "
              "for all rates together)"]
    for row in attribute_rates(recipe.design, planned, []):
        plan = row["planned"]
        rate = "-" if plan["rate"] is None else f"{100 * plan['rate']:.1f}"
        lines.append(f"  {row['key']:<58} {row['module'] or 'all':<34} {100 * row['target']:5.1f} {rate:>6} "
                     f"{plan['num_with']:>7}/{plan['num_cases']:<7} [{plan['interval'][0]}, {plan['interval'][1]}]")
    return lines


def prepare(args):
    """Everything checked before generation (the dry run stops after it)."""
    from gazal_nemo.config_io import require_writable_dir
    from gazal_nemo.parallel import launch_env
    from gazal_nemo.synth.backends import check_backend
    from gazal_nemo.synth.chunks import check_identity, check_shard_free
    from gazal_nemo.synth.config import load_synth_recipe
    from gazal_nemo.synth.finalize import load_benchmarks

    recipe = load_synth_recipe(args.recipe, args.overrides)
    output_dir = require_writable_dir(recipe.output_dir, "output_dir")
    resumed = check_identity(output_dir, recipe)
    benchmarks = load_benchmarks(recipe, dry_run=args.dry_run)
    teacher = None if args.finalize else check_backend(recipe, dry_run=args.dry_run)
    env = launch_env()
    if not args.finalize:
        check_shard_free(output_dir, env.rank, env.world_size)
    return recipe, output_dir, resumed, benchmarks, teacher, env


def run(args) -> int:
    from gazal_nemo.synth.backends import build_backend
    from gazal_nemo.synth.chunks import (
        chunk_done,
        keep_alive,
        release_shard,
        shard_chunks,
        take_shard,
        write_identity,
    )
    from gazal_nemo.synth.finalize import finalize
    from gazal_nemo.synth.generate import generate_shard

    recipe, output_dir, resumed, benchmarks, teacher, env = prepare(args)
    if args.finalize and args.dry_run:
        from gazal_nemo.synth.finalize import read_all_chunks

        examples, rejected, _ = read_all_chunks(recipe, output_dir)
        kept = sum(e["status"] == "kept" for e in examples)
        print(f"synth: every chunk is done: {kept} of {len(examples)} examples kept, {len(rejected)} rejected "
              f"attempts; --finalize would deduplicate, decontaminate and write {output_dir / 'data'}; dry run OK",
              flush=True)
        return 0
    if args.finalize:
        report = finalize(recipe, output_dir, benchmarks=benchmarks)
        print(f"synth: {report['final_rows']} rows in {report['data_dir']}; report {output_dir / 'report.md'}",
              flush=True)
        return 0
    shard, num_shards = env.rank, env.world_size
    print(f"synth: teacher: {teacher}", flush=True)
    print(f"synth: output {output_dir} ({'resuming' if resumed else 'new run'})", flush=True)
    for line in _plan(recipe, shard=shard, num_shards=num_shards, output_dir=output_dir):
        print(line, flush=True)
    if args.dry_run:
        print("synth: dry run OK", flush=True)
        return 0
    write_identity(output_dir, recipe)
    lock = take_shard(output_dir, shard, num_shards)
    stop_heartbeat = keep_alive(lock)
    backend, stats = None, None
    try:
        todo = [c for c in shard_chunks(recipe, shard, num_shards) if not chunk_done(output_dir, recipe, c)]
        if todo:  # an engine start costs minutes on a 27B model: only when there is work
            backend = build_backend(recipe, work_dir=output_dir / "work")
            generate_shard(recipe, backend, output_dir, todo)
            stats = backend.stats()
        else:
            print(f"synth: shard {shard} of {num_shards}: every chunk is done", flush=True)
    finally:
        if backend is not None:
            backend.close()
        stop_heartbeat.set()
        release_shard(lock)
    if num_shards > 1:
        print(f"synth: shard {shard} of {num_shards} done; once every shard is: gazal synth --recipe {args.recipe} "
              "--finalize (slurm/synth_8xh100.sh runs it)", flush=True)
        return 0
    report = finalize(recipe, output_dir, benchmarks=benchmarks, backend_stats=stats)
    acc, thr = report["acceptance"], report["throughput"]
    rate = f"{thr['completion_tokens_per_s']:.1f}" if thr["completion_tokens_per_s"] else "-"
    print(f"synth: {acc['kept']} of {acc['examples']} kept by validation, {report['final_rows']} rows after dedup and "
          f"decontam in {report['data_dir']}; {rate} completion tokens/s; report {output_dir / 'report.md'}",
          flush=True)
    return 0
