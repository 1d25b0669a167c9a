"""Generating one chunk of examples, and a shard's chunks one after the other.

A chunk goes in rounds. Each round sends every example still waiting for a case to the case
writer in one backend call (one engine batch, or `max_concurrency` HTTP requests at a time),
checks the cases, then sends every example with an accepted case and no accepted answer to
the teacher in a second call and checks the answers. A rejected case or answer is written to
the chunk as a `rejected` record (text, reasons) and regenerated in the next round; only the
rejected part is regenerated (an accepted case keeps its case). After validation.max_retries
regenerations the example is recorded as `failed`. So every index of the chunk ends as
exactly one `example` record, kept or failed.

Sampling seeds derive from (recipe seed, chunk, round, call), and each engine seeds its
requests from that and their position, so a chunk generated again after a kill draws as the
first time did (on the same engine and hardware).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from gazal_nemo.inference.protocol import SamplingSettings
from gazal_nemo.synth.attributes import CaseAttributes, draw_attributes
from gazal_nemo.synth.chunks import ChunkWriter, chunk_done, chunk_range
from gazal_nemo.synth.prompts import case_messages, response_messages, sft_messages
from gazal_nemo.synth.validate import check_case, check_response


def call_seed(seed: int, chunk: int, round_: int, call: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{chunk}:{round_}:{call}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def _settings(sampling, seed: int) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_k=sampling.top_k, top_p=sampling.top_p, seed=seed)


@dataclass
class _Example:
    attrs: CaseAttributes
    case_prompt: list[dict]
    rejections: int = 0
    case: str | None = None
    case_validation: dict | None = None
    finished: bool = False
    tokens: dict = field(default_factory=lambda: {"prompt": 0, "completion": 0})


@dataclass
class ChunkCounters:
    """What one chunk cost (the footer of its file; the report sums them)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    kept: int = 0
    failed: int = 0
    rejected_attempts: int = 0
    rounds: int = 0

    def to_json(self) -> dict:
        return dict(vars(self))


def generate_chunk(recipe, backend, output_dir: Path, chunk: int) -> ChunkCounters:
    """Generate, check and write chunk `chunk` (its file exists afterwards, complete)."""
    indices = chunk_range(recipe, chunk)
    cfg = recipe.validation
    counters = ChunkCounters()
    start = time.perf_counter()
    writer = ChunkWriter(output_dir, chunk)
    try:
        pending = []
        for index in indices:
            attrs = draw_attributes(recipe.design, recipe.seed, index)
            pending.append(_Example(attrs=attrs, case_prompt=case_messages(recipe, attrs)))

        def reject(example: _Example, stage: str, result, verdict, prompt) -> None:
            counters.rejected_attempts += 1
            example.rejections += 1
            writer.write({"type": "rejected", "index": example.attrs.index, "module": example.attrs.module,
                          "stage": stage, "attempt": example.rejections, "reasons": verdict.reasons,
                          "finish_reason": result.finish_reason, "error": result.error, "text": result.text,
                          "prompt": prompt})
            if example.rejections > cfg.max_retries:
                example.finished = True
                counters.failed += 1
                writer.write({"type": "example", "status": "failed", "index": example.attrs.index,
                              "module": example.attrs.module, "attributes": example.attrs.to_json(),
                              "stage": stage, "reasons": verdict.reasons, "attempts": example.rejections})

        round_ = 0
        while pending:
            need_case = [e for e in pending if e.case is None]
            if need_case:
                results = backend.chat([e.case_prompt for e in need_case],
                                       _settings(recipe.generator.case_sampling, call_seed(recipe.seed, chunk, round_, "case")))
                for example, result in zip(need_case, results):
                    _count(counters, example, result)
                    verdict = check_case(result.text, cfg, finish_reason=result.finish_reason)
                    if verdict.rejects(cfg.enforce):
                        reject(example, "case", result, verdict, example.case_prompt)
                    else:
                        example.case, example.case_validation = result.text.strip(), verdict.to_json()
            ready = [e for e in pending if e.case is not None and not e.finished]
            if ready:
                prompts = [response_messages(recipe, e.attrs, e.case) for e in ready]
                results = backend.chat(prompts, _settings(recipe.generator.response_sampling,
                                                          call_seed(recipe.seed, chunk, round_, "response")))
                for example, prompt, result in zip(ready, prompts, results):
                    _count(counters, example, result)
                    verdict = check_response(result.text, cfg, finish_reason=result.finish_reason)
                    if verdict.rejects(cfg.enforce):
                        reject(example, "response", result, verdict, prompt)
                        continue
                    example.finished = True
                    counters.kept += 1
                    response = result.text.strip()
                    writer.write({
                        "type": "example", "status": "kept", "index": example.attrs.index,
                        "id": f"{recipe.name}-{example.attrs.index:07d}", "module": example.attrs.module,
                        "attributes": example.attrs.to_json(),
                        "prompt": {"case": example.case_prompt, "response_system": prompt[0]["content"]},
                        "case": example.case, "generation": response,
                        "messages": sft_messages(recipe, example.case, response),
                        "attempts": example.rejections + 1, "finish_reason": result.finish_reason,
                        "tokens": example.tokens,
                        "validation": {"case": example.case_validation, "response": verdict.to_json()}})
            pending = [e for e in pending if not e.finished]
            round_ += 1
        counters.rounds = round_
        counters.seconds = time.perf_counter() - start
        writer.finish({"chunk": chunk, "start": indices.start, "stop": indices.stop, "counters": counters.to_json()})
    except BaseException:
        writer.abandon()  # the partial file stays: never read as data, replaced when the chunk runs again
        raise
    return counters


def _count(counters: ChunkCounters, example: _Example, result) -> None:
    counters.requests += 1
    counters.prompt_tokens += result.prompt_tokens
    counters.completion_tokens += result.completion_tokens
    example.tokens["prompt"] += result.prompt_tokens
    example.tokens["completion"] += result.completion_tokens


def generate_shard(recipe, backend, output_dir: Path, chunks: list[int]) -> ChunkCounters:
    """Generate the chunks of `chunks` that are not done yet; totals of what this process generated."""
    total = ChunkCounters()
    todo = [c for c in chunks if not chunk_done(output_dir, recipe, c)]
    for number, chunk in enumerate(todo, start=1):
        counters = generate_chunk(recipe, backend, output_dir, chunk)
        for name, value in counters.to_json().items():
            setattr(total, name, getattr(total, name) + value)
        rate = counters.completion_tokens / counters.seconds if counters.seconds else 0.0
        print(f"synth: chunk {chunk} ({number}/{len(todo)}): {counters.kept} kept, {counters.failed} failed, "
              f"{counters.rejected_attempts} rejected attempts, {counters.requests} requests, "
              f"{counters.completion_tokens} tokens in {counters.seconds:.1f}s ({rate:.0f} tokens/s)", flush=True)
    return total
