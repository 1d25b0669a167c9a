"""The evaluation loop: prompts -> engine -> one predictions line per answer, resumable.

Every answer is appended to `<out>/predictions.jsonl` (and flushed) as soon as its batch
is done, so a killed run keeps what it finished; the next run with the same --out reads
the log, skips every prompt id already there (a torn last line is dropped) and generates
only the rest. `<out>/eval_settings.json` records what produced the log; resuming with
different settings (model, decoding, prompt, permutations) is refused instead of mixing
two evaluations in one table. Greedy decoding makes a resumed run identical to an
uninterrupted one; with sampling each batch is seeded by its position in the full prompt
list, so a resumed run is an equally valid sample, not the same one.

The answer is the GRPO accuracy reward's extractor (rl.rewards.final_answer_letter: the
last boxed option after the reasoning block); --keep-reasoning takes the last box anywhere.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gazal_nemo.eval.prompting import EvalPrompt
from gazal_nemo.inference.protocol import SamplingSettings
from gazal_nemo.inference.stopping import completion_text
from gazal_nemo.tasks.mcq import extract_answer_letter, final_answer_letter

PREDICTIONS = "predictions.jsonl"
SETTINGS = "eval_settings.json"


@dataclass(frozen=True, kw_only=True)
class DecodingConfig:
    """How completions are drawn (the defaults score the paper's way: greedy, one answer)."""

    max_new_tokens: int = 4096
    """Completion budget in tokens (the GRPO recipe's max completion length)."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples (Qwen3's thinking-mode advice: 0.6)."""
    top_k: int = 20
    """Sampling only: keep the k most likely tokens (0 = all)."""
    top_p: float = 0.95
    """Sampling only: nucleus mass."""
    seed: int = 0
    """Seeds sampling and the permutation draw."""
    num_samples: int = 1
    """Answers per prompt; accuracy averages over them (needs temperature > 0 to differ)."""
    batch_size: int = 16
    """Prompts per engine call (and per flush of the predictions log)."""

    def __post_init__(self):
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1, "num_samples": self.num_samples >= 1,
                  "batch_size": self.batch_size >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"--{bad[0].replace('_', '-')}={getattr(self, bad[0])!r}: out of range")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("--num-samples > 1 with --temperature 0 repeats one greedy answer; set --temperature")

    def sampling(self, position: int) -> SamplingSettings:
        """The engine settings of the batch starting at `position` in the full prompt list (its seed)."""
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_k=self.top_k if self.temperature > 0 else 0,
                                top_p=self.top_p if self.temperature > 0 else 1.0,
                                seed=self.seed * 1_000_003 + position)


def read_finished(path: Path) -> dict[str, dict]:
    """Records of a predictions log by key; a torn (half-written) last line is ignored."""
    done = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a killed run was writing
        done[record_key(record["prompt_id"], record["sample"])] = record
    return done


def record_key(prompt_id: str, sample: int) -> str:
    return f"{prompt_id}#s{sample}"


def check_resume(out_dir: Path, settings: dict, *, overwrite: bool) -> None:
    """Refuse to continue a log written with other settings (read-only: every rank may call)."""
    from gazal_nemo.hub import read_json_file

    path = out_dir / SETTINGS
    if not overwrite and path.is_file():
        before = read_json_file(path, "eval settings")
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ValueError(f"{out_dir}: holds an evaluation with other settings ({', '.join(changed)}); "
                             "use another --out, or --overwrite to start again")


def prepare_out_dir(out_dir: Path, settings: dict, *, overwrite: bool) -> None:
    """One process: drop an old evaluation if overwriting, then record the settings."""
    if overwrite:
        for name in (PREDICTIONS, SETTINGS, "results.json", "results.md"):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{SETTINGS}.partial"
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    tmp.replace(out_dir / SETTINGS)


def score_completion(prompt: EvalPrompt, text: str, *, keep_reasoning: bool) -> str | None:
    """The answer letter as shown: the accuracy reward's (after </think>), or the last box anywhere."""
    if keep_reasoning:
        return extract_answer_letter(text, prompt.option_letters)
    return final_answer_letter(text, prompt.option_letters)


def _record(prompt: EvalPrompt, sample: int, completion, text: str, letter, seconds: float) -> dict:
    return {"prompt_id": prompt.prompt_id, "benchmark": prompt.benchmark, "question_id": prompt.question_id,
            "permutation": prompt.permutation, "sample": sample, "options_order": list(prompt.options_order),
            "completion": text, "extracted": letter, "gold": prompt.gold, "correct": letter == prompt.gold,
            "tokens": len(completion.tokens), "truncated": bool(completion.truncated), "seconds": seconds}


def run_prompts(prompts: list[EvalPrompt], engine, tokenizer, *, out_dir: Path, decoding: DecodingConfig,
                stop_ids: list[int], keep_reasoning: bool = False, writer: bool = True,
                progress_every: int = 1) -> list[dict]:
    """Generate every unfinished (prompt, sample), appending records as batches finish; all records.

    Every TP rank calls this with the same prompts (the engine needs all of them); only
    the `writer` rank writes the log."""
    log = out_dir / PREDICTIONS
    done = read_finished(log)
    jobs = [(p, s) for p in prompts for s in range(decoding.num_samples)]
    pending = [(i, p, s) for i, (p, s) in enumerate(jobs) if record_key(p.prompt_id, s) not in done]
    if writer and done:
        print(f"eval: resuming, {len(jobs) - len(pending)} of {len(jobs)} answers already in {log}", flush=True)
    handle = open(log, "a", encoding="utf-8") if writer else None
    try:
        if handle is not None and log.stat().st_size and not log.read_bytes().endswith(b"\n"):
            handle.write("\n")  # end the torn line so the next record starts on its own line
        batches = [pending[i:i + decoding.batch_size] for i in range(0, len(pending), decoding.batch_size)]
        for number, batch in enumerate(batches):
            t0 = time.time()
            completions = engine.generate([p.prompt_ids for _, p, _ in batch], decoding.sampling(batch[0][0]))
            seconds = (time.time() - t0) / len(batch)
            for (_, prompt, sample), completion in zip(batch, completions):
                text = completion_text(tokenizer, completion.tokens, stop_ids)
                letter = score_completion(prompt, text, keep_reasoning=keep_reasoning)
                record = _record(prompt, sample, completion, text, letter, seconds)
                done[record_key(prompt.prompt_id, sample)] = record
                if handle is not None:
                    handle.write(json.dumps(record) + "\n")
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
                if (number + 1) % progress_every == 0 or number + 1 == len(batches):
                    _print_progress(done, len(jobs))
    finally:
        if handle is not None:
            handle.close()
    return [done[record_key(p.prompt_id, s)] for p, s in jobs]


def _print_progress(done: dict, total: int) -> None:
    records = list(done.values())
    correct = sum(r["correct"] for r in records)
    unanswered = sum(r["extracted"] is None for r in records)
    print(f"  eval: {len(records)}/{total} generated, {correct} correct, {unanswered} without an answer",
          flush=True)


def settings_fingerprint(*, model: str, base: str | None, benchmarks: list[str], data: list[str],
                         decoding: DecodingConfig, system_prompt: str | None, num_permutations: int,
                         keep_reasoning: bool, limit: int | None, mmlu_pro_categories) -> dict:
    """What must match for a predictions log to be continued (batch size and engine may change)."""
    fields = asdict(decoding)
    fields.pop("batch_size")
    return {"model": model, "base": base, "benchmarks": benchmarks, "data": data, "decoding": fields,
            "system_prompt": system_prompt, "num_permutations": num_permutations,
            "keep_reasoning": keep_reasoning, "limit": limit, "mmlu_pro_categories": list(mmlu_pro_categories)}
