"""Finished chunks -> the dataset folder, rejected.jsonl and the report.

Runs when every chunk of the run is complete (one process: after its own generation; a
multi-shard job: `gazal synth --finalize` once all shards are done). It reads every chunk
(checking each is whole), removes exact and near-duplicates (synth.dedup), removes rows that
contain a benchmark question by `gazal decontam`'s n-gram rule (eval.decontam, the public
machinery of that command), then writes

    data/<name>-00000-of-00011.jsonl ...   the kept rows (format `messages` for `gazal sft`, plus
                                           attributes, prompt, case, generation, validation)
    rejected.jsonl                         every rejected attempt, failed example and removed row, with its reason
    report.json, report.md, rates.svg

The data folder is written under a temporary name and renamed whole, so `gazal sft` never
reads a half-written one. Finalizing again gives the same files (nothing here is random).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gazal_nemo.synth.chunks import ChunkDamaged, chunk_path, chunk_range, read_chunk
from gazal_nemo.synth.dedup import deduplicate
from gazal_nemo.synth.report import acceptance, attribute_rates, throughput, write_report


def load_benchmarks(recipe, *, dry_run: bool = False) -> dict:
    """The decontam benchmarks' questions (local files are read by the dry run too; hub ids only by a run)."""
    from gazal_nemo.data.sources import check_local_source, is_local_source

    benchmarks = {}
    for position, bench in enumerate(recipe.decontam.benchmarks):
        check_local_source(bench.path, f"decontam.benchmarks[{position}].path")
        if dry_run and not is_local_source(bench.path):
            continue
        from gazal_nemo.eval.loaders import load_benchmark

        try:
            questions, _ = load_benchmark(bench.name, bench.path, split=recipe.decontam.split, max_bad_fraction=1.0)
        except ValueError as e:
            raise ValueError(f"decontam.benchmarks[{position}] ({bench.name}): {e}") from None
        benchmarks[bench.name] = questions
    return benchmarks


def read_all_chunks(recipe, output_dir: Path):
    """(examples, rejected, footers) of every chunk; ValueError naming what is missing or damaged."""
    missing = [c for c in range(recipe.num_chunks) if not chunk_path(output_dir, c).is_file()]
    if missing:
        raise ValueError(f"output_dir={str(output_dir)!r}: {len(missing)} of {recipe.num_chunks} chunks are not "
                         f"generated yet (first: {chunk_path(output_dir, missing[0]).name}); run `gazal synth` "
                         "again, it resumes")
    examples, rejected, footers = [], [], []
    for chunk in range(recipe.num_chunks):
        try:
            read = read_chunk(chunk_path(output_dir, chunk), chunk_range(recipe, chunk))
        except ChunkDamaged as e:
            raise ValueError(f"{e}; run `gazal synth` again to generate that chunk again") from None
        examples += read.examples
        rejected += read.rejected
        footers.append(read.footer)
    return examples, rejected, footers


def _dedup_text(row: dict, field: str) -> str:
    if field == "both":
        return row["case"] + "\n" + row["generation"]
    return row[field]


def _decontaminate(recipe, rows: list[dict], benchmarks: dict, work: Path) -> tuple[dict[int, list], dict]:
    """{position in rows: [(benchmark, question id)]} of the rows that hold a benchmark question, and a summary."""
    if not benchmarks:
        return {}, {"checked": False, "summary": "not checked (decontam.benchmarks is empty)"}
    from gazal_nemo.eval.decontam import find_overlaps

    work.mkdir(parents=True, exist_ok=True)
    path = work / "decontam_rows.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({"case": row["case"], "generation": row["generation"]}, ensure_ascii=False) + "\n")
    flagged, _ = find_overlaps(benchmarks, [str(path)], keys=["case", "generation"], n=recipe.decontam.ngram,
                               min_overlap=recipe.decontam.min_overlap)
    hits: dict[int, list] = {}
    for overlap in flagged:
        for _, position in overlap.training_rows:
            hits.setdefault(position, []).append((overlap.benchmark, overlap.question_id))
    path.unlink()
    per_benchmark = {name: sum(o.benchmark == name for o in flagged) for name in benchmarks}
    summary = (f"{len(hits)} rows removed for {len(flagged)} benchmark questions found ("
               + ", ".join(f"{name} {count} of {len(benchmarks[name])}" for name, count in per_benchmark.items())
               + f"; {recipe.decontam.ngram}-gram overlap >= {recipe.decontam.min_overlap:g})")
    return hits, {"checked": True, "questions": {n: len(q) for n, q in benchmarks.items()},
                  "contaminated_questions": per_benchmark, "rows_removed": len(hits), "summary": summary}


def _write_lines(path: Path, rows) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_data(output_dir: Path, name: str, rows: list[dict], rows_per_file: int) -> Path:
    final = output_dir / "data"
    staging = output_dir / ".data.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    num_files = max(1, -(-len(rows) // rows_per_file))
    for number in range(num_files):
        part = rows[number * rows_per_file:(number + 1) * rows_per_file]
        _write_lines(staging / f"{name}-{number:05d}-of-{num_files:05d}.jsonl", part)
    old = output_dir / ".data.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def finalize(recipe, output_dir: Path, *, benchmarks: dict | None = None, backend_stats: dict | None = None) -> dict:
    """Write the dataset, the rejects and the report of a run whose chunks are all done; the report."""
    output_dir = Path(output_dir)
    examples, rejected, footers = read_all_chunks(recipe, output_dir)
    examples.sort(key=lambda e: e["index"])
    kept = [e for e in examples if e["status"] == "kept"]
    removed_rows = []
    dedup_summary = {"field": recipe.dedup.field, "exact": 0, "near": 0}
    if recipe.dedup.enabled and kept:
        removed = deduplicate([_dedup_text(row, recipe.dedup.field) for row in kept], recipe.dedup)
        for position, (kind, original) in sorted(removed.items()):
            dedup_summary[kind] += 1
            removed_rows.append({"type": "removed", "reason": f"duplicate_{kind}", "index": kept[position]["index"],
                                 "module": kept[position]["module"], "duplicate_of": kept[original]["index"],
                                 "case": kept[position]["case"], "generation": kept[position]["generation"]})
        kept = [row for position, row in enumerate(kept) if position not in removed]
    if benchmarks is None:
        benchmarks = load_benchmarks(recipe)
    hits, decontam_summary = _decontaminate(recipe, kept, benchmarks, output_dir / ".work")
    for position, questions in sorted(hits.items()):
        removed_rows.append({"type": "removed", "reason": "contaminated", "index": kept[position]["index"],
                             "module": kept[position]["module"], "benchmark_questions": questions,
                             "case": kept[position]["case"], "generation": kept[position]["generation"]})
    final_rows = [{k: v for k, v in row.items() if k not in ("type", "status")}
                  for position, row in enumerate(kept) if position not in hits]
    data_dir = _write_data(output_dir, recipe.name, final_rows, recipe.rows_per_file)
    failed = [e for e in examples if e["status"] == "failed"]
    _write_lines(output_dir / "rejected.jsonl", [*rejected, *failed, *removed_rows])
    report = {
        "name": recipe.name, "num_examples": recipe.num_examples, "seed": recipe.seed,
        "validation_enforced": recipe.validation.enforce, "final_rows": len(final_rows), "data_dir": str(data_dir),
        "acceptance": acceptance(examples, rejected),
        "attribute_rates": attribute_rates(recipe.design, [e["attributes"] for e in examples],
                                           [row["attributes"] for row in final_rows]),
        "throughput": throughput(footers, backend_stats),
        "dedup": dedup_summary, "decontam": decontam_summary,
    }
    write_report(output_dir, report)
    shutil.rmtree(output_dir / ".work", ignore_errors=True)
    for leftover in sorted((output_dir / "chunks").glob(".chunk-*")):  # partial or damaged copies of done chunks
        leftover.unlink(missing_ok=True)
    return report
