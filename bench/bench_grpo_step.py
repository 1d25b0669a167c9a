"""One GRPO step: our megatron rollout + training step next to TRL's GRPOTrainer.

The GRPO issue's question: how long does one optimizer step of the paper's GRPO take
(sample `--num-generations` completions for each of `--num-prompts` prompts, score them,
group-normalise the rewards, one clipped policy-gradient update), and how fast is the
generation inside it?

  ours       MegatronEngine (megatron's static KV cache on the training model, our
             sampling loop), then `build_microbatches` + `make_forward_step` (the GRPO stage's
             own pieces) through `run_step`: megatron DDP, mixed-precision AdamW, bf16 params
             with fp32 main weights.
  ours_vllm  the same trainer with the vLLM engine colocated in the process, as
             grpo.rollout.engine=vllm runs it: each step pushes the trainer's weights into vLLM
             (and gates them), vLLM generates, then the same training pass. The push is part of
             the step's time. TRL's own vLLM colocate mode fails on CPU at its weight push
             (vLLM's CPU backend repacks linear weights, so `load_weights` finds no parameter
             to load into), so on CPU TRL is compared on transformers `generate`.
  trl   TRL's GRPOTrainer (HF `generate` with a KV cache; no vLLM) for max_steps=1.

Same settings on both sides: the same prompt texts, tokenised by the same tokenizer;
sampling temperature 0.6, top-k 20, top-p 0.95 (paper); every completion generated in
one batch of num_prompts x num_generations; training micro-batches of
`--micro-batch-size` completions, one optimizer step over all of them; clip 0.2 / 0.28,
beta 0, token-level "bnpo" normalisation, std-scaled group advantages, lr 1e-6, clip-norm
1.0, activation recompute on (megatron full recompute / HF non-reentrant gradient
checkpointing); the same cheap synthetic reward (below). Two deliberate departures from
the paper, the same on both sides: truncated completions are kept in the loss (a
random-init model almost never samples the stop token, so masking them would train on
nothing), and --max-new-tokens defaults to 512 rather than 4096 so the run fits a
10-minute device call.

Random init, and TRL's first step. A random-init Qwen3 in TRL once gave a NaN grad norm
in its first step, and the next step's sampling then crashed on the NaN weights. So TRL
is timed on exactly one step, its first, and we compare it with our first step: before
either, both sides get the same light warm-up (a short generation and one forward/backward
pass with the gradients thrown away, no optimizer step), which takes kernel selection and
lazy initialisation out of the first step without touching the weights. Our later steps
(--steps > 1) are reported separately as steady state. The grad norm of every timed step
is recorded; a NaN there is reported, not hidden.

Tokenizer: the hub is not reachable, so both sides use the small byte-level BPE of
gazal_nemo.testing.tiny (ChatML specials); the model vocabulary is the real one (151936),
and sampled ids the tokenizer does not know decode to nothing.

    python bench/bench_grpo_step.py --shape 0.6b,1.7b                        # GPU
    python bench/bench_grpo_step.py --shape tiny --device cpu --num-prompts 4 --prompt-length 16 --max-new-tokens 8
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.model_shapes import build_hf, build_ours, hf_config_dict, parse_shapes  # noqa: E402

BENCH = "grpo_step"
VARIANTS = ("trl", "ours", "ours_vllm")  # baseline first: no HF model may be built after init_parallel
TEMPERATURE, TOP_K, TOP_P = 0.6, 20, 0.95
EPS_LOW, EPS_HIGH, LR, GRAD_CLIP = 0.2, 0.28, 1e-6, 1.0
WARMUP_PROMPTS, WARMUP_NEW_TOKENS = 4, 8


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], default_shape="0.6b,1.7b", variants=VARIANTS)
    parser.add_argument("--num-prompts", type=int, default=None, help="default 32 (tiny: 4)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=None,
                        help="tokens per prompt, approximately; default 256 (tiny: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 512 (tiny: 16)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--recompute", default="full", choices=("none", "full"))
    parser.add_argument("--trl-dtype", default="bf16", choices=("bf16", "fp32"),
                        help="TRL model weights: bf16 (what TRL trains with for a bf16 checkpoint) or fp32 "
                             "(fp32 weights under bf16 autocast)")
    args = parser.parse_args(argv)
    # --warmup counts light warm-up rounds here; --steps counts our timed steps (TRL: always 1).
    common.fill_defaults(args, full=dict(num_prompts=32, prompt_length=256, max_new_tokens=512, warmup=1, steps=1),
                         smoke=dict(num_prompts=4, prompt_length=16, max_new_tokens=16, warmup=1, steps=2))
    total = args.num_prompts * args.num_generations
    if args.num_generations < 2 or total % args.micro_batch_size:
        raise ValueError(f"--num-prompts {args.num_prompts} x --num-generations {args.num_generations} = {total} "
                         f"must divide by --micro-batch-size {args.micro_batch_size}, and num-generations >= 2")
    return args


# ---- shared inputs -------------------------------------------------------------------------

def make_tokenizer(workdir: str):
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    return make_tiny_tokenizer(Path(workdir) / "tokenizer")


def make_prompts(tokenizer, *, num_prompts: int, prompt_length: int, seed: int) -> list[str]:
    """Prompt texts of about `prompt_length` tokens (the byte-level pre-tokenizer splits at
    spaces, so a text's token count is the sum of its words' counts)."""
    rng = random.Random(seed)
    words = sorted({w for w in " ".join(_CORPUS_WORDS).split()})
    cost = {w: len(tokenizer(" " + w)["input_ids"]) for w in words}
    prompts = []
    for _ in range(num_prompts):
        picked, tokens = [], 0
        while tokens < prompt_length:
            word = rng.choice(words)
            picked.append(word)
            tokens += cost[word]
        prompts.append(" " + " ".join(picked))
    return prompts


_CORPUS_WORDS = [
    "A 65-year-old man presents with chest pain, dyspnea and elevated troponin.",
    "Which of the following is the most likely diagnosis? Consider differential diagnoses by system.",
    "Treatment plan: aspirin, heparin, emergent PCI; follow-up with echocardiogram.",
]


def synthetic_reward(completion: str) -> float:
    """Cheap and different across completions, so advantages are not all zero; its cost is
    negligible next to generation, and it is the same function on both sides."""
    return (len(completion) % 5) / 4.0


def _trl_reward(prompts, completions, **kwargs) -> list[float]:
    return [synthetic_reward(c) for c in completions]


# ---- ours ----------------------------------------------------------------------------------

def _grpo_recipe(args):
    """The slice of a recipe that `make_forward_step` reads."""
    from gazal_nemo.rl.config import GRPOLossConfig, SamplingConfig

    sampling = SamplingConfig(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P,
                              num_generations=args.num_generations, max_new_tokens=args.max_new_tokens)
    loss = GRPOLossConfig(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.0, normalisation="bnpo", mask_truncated=False,
                          scale_advantages_by_std=True)
    return SimpleNamespace(grpo=SimpleNamespace(sampling=sampling, loss=loss))


def measure_ours(name: str, args, device: torch.device, prompt_texts: list[str], tokenizer,
                 engine_name: str = "megatron") -> dict:
    from gazal_nemo.inference.registry import PolicyContext, build_policy_engine
    from gazal_nemo.recipe import RolloutConfig
    from gazal_nemo.stages.grpo import make_forward_step

    common.init_megatron(args.seed)
    trainer = build_ours(name, recompute=args.recompute, lr=LR, weight_decay=0.0, total_steps=args.steps + 1,
                         seed=args.seed)
    prompt_ids = [tokenizer(text)["input_ids"] for text in prompt_texts]
    total = args.num_prompts * args.num_generations
    with tempfile.TemporaryDirectory() as folder:
        context = PolicyContext(
            model=trainer.model, shape=trainer.shape, hf_dir=_config_folder(name, tokenizer, Path(folder)), tp=1, dp=1,
            dtype="bf16", seed=args.seed, max_model_len=max(map(len, prompt_ids)) + args.max_new_tokens,
            stop_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id, probe=prompt_ids[0][:64])
        rollout = RolloutConfig(engine=engine_name)
        rollout.megatron.max_batch_size = total
        rollout.vllm.max_num_seqs = total
        engine = build_policy_engine(engine_name, context, rollout)
        forward_step = make_forward_step(_grpo_recipe(args))
        try:
            for _ in range(args.warmup):
                engine.sync_weights(-2)
                _ours_warmup(trainer, engine, forward_step, prompt_ids, tokenizer, args)
            steps = [_ours_step(trainer, engine, forward_step, prompt_ids, tokenizer, args, device, index)
                     for index in range(args.steps)]
        finally:
            engine.close()
            trainer.release()
    return _fields(steps, args, device, first_step_only=False)


def _config_folder(name: str, tokenizer, folder: Path) -> str:
    """config.json of the shape + the bench tokenizer: what a dummy-loaded vLLM reads."""
    import json

    (folder / "config.json").write_text(json.dumps({**hf_config_dict(name), "torch_dtype": "bfloat16"}))
    tokenizer.save_pretrained(folder)
    return str(folder)


def _ours_generate(engine, prompt_ids, tokenizer, args, *, num_generations, max_new_tokens, seed):
    from gazal_nemo.inference.protocol import SamplingSettings

    repeated = [p for p in prompt_ids for _ in range(num_generations)]
    completions = engine.generate(repeated, SamplingSettings(max_new_tokens=max_new_tokens, temperature=TEMPERATURE,
                                                             top_k=TOP_K, top_p=TOP_P, seed=seed))
    for c in completions:  # generate() saw each prompt repeated; point back at the prompt
        c.prompt_index //= num_generations
    return completions


def _ours_microbatches(completions, prompt_ids, tokenizer, args):
    from gazal_nemo.rl.advantages import group_advantages
    from gazal_nemo.stages.grpo import build_microbatches, completion_text

    stop_ids = [tokenizer.eos_token_id]
    rewards = torch.tensor([synthetic_reward(completion_text(tokenizer, c.tokens, stop_ids)) for c in completions])
    adv = group_advantages(rewards, num_generations=args.num_generations, scale_by_std=True, eps=1e-4)
    prompts = [SimpleNamespace(prompt_ids=p) for p in prompt_ids]
    return build_microbatches(prompts, completions, adv.advantages, micro_batch_size=args.micro_batch_size,
                              pad_id=tokenizer.pad_token_id)


def _ours_warmup(trainer, engine, forward_step, prompt_ids, tokenizer, args) -> None:
    """A short generation and one forward/backward, gradients discarded, no optimizer step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    few = prompt_ids[:WARMUP_PROMPTS]
    completions = _ours_generate(engine, few, tokenizer, args, num_generations=2, max_new_tokens=WARMUP_NEW_TOKENS,
                                 seed=args.seed + 999)
    args_few = SimpleNamespace(**{**vars(args), "num_generations": 2, "micro_batch_size": len(completions)})
    microbatches = _ours_microbatches(completions, few, tokenizer, args_few)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(microbatches),
                                model=[trainer.chunk], num_microbatches=len(microbatches),
                                seq_length=microbatches[0]["input_ids"].shape[1],
                                micro_batch_size=len(completions), forward_only=False)
    trainer.chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()


def _ours_step(trainer, engine, forward_step, prompt_ids, tokenizer, args, device, index: int) -> dict:
    from gazal_nemo.training.step import run_step

    common.synchronize(device)
    start = time.perf_counter()
    push_s = common.timed(lambda: engine.sync_weights(index), device)[1]  # vLLM: push + gate; megatron: nothing
    completions, gen_s = common.timed(
        lambda: _ours_generate(engine, prompt_ids, tokenizer, args, num_generations=args.num_generations,
                               max_new_tokens=args.max_new_tokens, seed=args.seed + index), device)
    engine.release_memory()
    microbatches = _ours_microbatches(completions, prompt_ids, tokenizer, args)
    metrics = run_step(chunks=[trainer.chunk], optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                       forward_step=forward_step, microbatches=microbatches,
                       seq_length=max(mb["input_ids"].shape[1] for mb in microbatches),
                       micro_batch_size=args.micro_batch_size)
    common.synchronize(device)
    step_s = time.perf_counter() - start
    loss_sum, count = metrics["loss"].tolist()
    return {"step_time_s": step_s, "gen_time_s": gen_s, "push_time_s": push_s,
            "gen_tokens": sum(len(c.tokens) for c in completions),
            "num_completions": len(completions), "grad_norm": metrics["grad_norm"],
            "loss": loss_sum / max(count, 1), "skipped": metrics["skipped"]}


# ---- TRL -----------------------------------------------------------------------------------

def measure_trl(name: str, args, device: torch.device, prompt_texts: list[str], tokenizer, workdir: str) -> dict:
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as error:
        return {"status": "skipped", "error": f"trl is not importable ({error}); see bench/README.md"}
    dtype = torch.bfloat16 if args.trl_dtype == "bf16" else torch.float32
    model = build_hf(name, device=device, dtype=dtype, recompute="none", use_cache=True, seed=args.seed)
    total = args.num_prompts * args.num_generations
    config = GRPOConfig(
        output_dir=str(Path(workdir) / "trl"), max_steps=1, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=GRAD_CLIP, optim="adamw_torch",
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=total // args.micro_batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, beta=0.0, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        loss_type="bnpo", scale_rewards="group", mask_truncated_completions=False, num_iterations=1,
        gradient_checkpointing=args.recompute == "full", gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=True, use_cpu=device.type == "cpu", shuffle_dataset=False, seed=args.seed, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    timer = _StepTimer(device)
    trainer = GRPOTrainer(model=model, reward_funcs=[_trl_reward], args=config,
                          train_dataset=Dataset.from_dict({"prompt": prompt_texts}), processing_class=tokenizer,
                          callbacks=[timer.callback()])
    eos_ids = [tokenizer.eos_token_id]
    generation = _time_generate(trainer.model, device, eos_ids)
    for _ in range(args.warmup):
        _trl_warmup(trainer.model, tokenizer, prompt_texts, device)
    generation.calls.clear()
    trainer.train()
    step = {"step_time_s": timer.durations[0], "gen_time_s": sum(c["seconds"] for c in generation.calls),
            "gen_tokens": sum(c["tokens"] for c in generation.calls),
            "num_completions": sum(c["rows"] for c in generation.calls),
            "grad_norm": timer.logs.get("grad_norm"), "loss": timer.logs.get("loss")}
    return {**_fields([step], args, device, first_step_only=True), "trl_dtype": args.trl_dtype,
            "trl_log": {k: v for k, v in timer.logs.items() if isinstance(v, (int, float))}}


class _StepTimer:
    """Wall time of each optimizer step (device synchronised) and the trainer's logged metrics."""

    def __init__(self, device):
        self.device, self.durations, self.logs, self._start = device, [], {}, None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class StepTimerCallback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                common.synchronize(timer.device)
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                common.synchronize(timer.device)
                timer.durations.append(time.perf_counter() - timer._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                timer.logs.update(logs or {})

        return StepTimerCallback()


def _time_generate(model, device, eos_ids: list[int]):
    """Wrap model.generate to record its time and the completion tokens it produced
    (up to and including the first stop token, as TRL and our engine both count them)."""
    original = model.generate
    record = SimpleNamespace(calls=[])

    def generate(*a, **kw):
        inputs = kw.get("input_ids", a[0] if a else None)
        out, seconds = common.timed(lambda: original(*a, **kw), device)
        new = out[:, inputs.shape[1]:]
        is_stop = torch.isin(new, torch.tensor(eos_ids, device=new.device))
        first = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, torch.full_like(new[:, 0], new.shape[1]))
        record.calls.append({"seconds": seconds, "tokens": int(first.sum()), "rows": new.shape[0]})
        return out

    model.generate = generate
    return record


def _trl_warmup(model, tokenizer, prompt_texts, device) -> None:
    """The same light warm-up as ours: a short sampled generation and one forward/backward,
    gradients discarded, no optimizer step."""
    batch = tokenizer(prompt_texts[:WARMUP_PROMPTS], return_tensors="pt", padding=True, padding_side="left")
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=WARMUP_NEW_TOKENS, do_sample=True, temperature=TEMPERATURE,
                             top_k=TOP_K, top_p=TOP_P, pad_token_id=tokenizer.pad_token_id)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=out, use_cache=False).logits
    logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


# ---- report --------------------------------------------------------------------------------

def _fields(steps: list[dict], args, device, *, first_step_only: bool) -> dict:
    """The first step is the compared number; later steps (ours only) are steady state."""
    first = steps[0]
    out = {
        "step_time_s": first["step_time_s"], "gen_time_s": first["gen_time_s"],
        "train_time_s": first["step_time_s"] - first["gen_time_s"], "gen_tokens": first["gen_tokens"],
        "gen_tokens_per_s": first["gen_tokens"] / first["gen_time_s"] if first["gen_time_s"] else None,
        "num_completions": first["num_completions"], "grad_norm": first["grad_norm"], "loss": first["loss"],
        "peak_mem_gib": common.peak_memory_gib(device), "timed_steps": "first step only" if first_step_only else
        f"first of {len(steps)}", "steps": steps,
    }
    later = steps[1:]
    if later:
        import statistics

        out["steady_step_time_median_s"] = statistics.median(s["step_time_s"] for s in later)
        out["steady_gen_tokens_per_s_median"] = statistics.median(s["gen_tokens"] / s["gen_time_s"] for s in later)
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    variants = common.parse_variants(args.variants, VARIANTS)
    shapes = parse_shapes(args.shape)
    reporter = common.Reporter(BENCH, args.out_dir, device)
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as workdir:
        tokenizer = make_tokenizer(workdir)
        prompt_texts = make_prompts(tokenizer, num_prompts=args.num_prompts, prompt_length=args.prompt_length,
                                    seed=args.seed)
        prompt_tokens = [len(tokenizer(t)["input_ids"]) for t in prompt_texts]
        jobs = []
        for variant in variants:  # the baseline before any megatron variant
            for name in shapes:
                identity = {"variant": variant, "shape": name, "dtype": "bf16", "num_prompts": args.num_prompts,
                            "num_generations": args.num_generations, "prompt_tokens_mean":
                            sum(prompt_tokens) / len(prompt_tokens), "max_new_tokens": args.max_new_tokens,
                            "micro_batch_size": args.micro_batch_size, "recompute": args.recompute,
                            "temperature": TEMPERATURE, "top_k": TOP_K, "top_p": TOP_P, "warmup_rounds": args.warmup}
                if variant == "trl":
                    fn = lambda n=name: measure_trl(n, args, device, prompt_texts, tokenizer, workdir)  # noqa: E731
                else:
                    engine = "vllm" if variant == "ours_vllm" else "megatron"
                    fn = lambda n=name, e=engine: measure_ours(n, args, device, prompt_texts, tokenizer, e)  # noqa: E731
                jobs.append((identity, fn))
        records = common.run_variants(reporter, jobs, args=args, device=device)
    print(report(reporter, records, shapes, args))
    return records


def report(reporter, records: list[dict], shapes: list[str], args) -> str:
    rows = [[r["variant"], r["shape"], r.get("status"), r.get("step_time_s"), r.get("gen_time_s"),
             r.get("gen_tokens"), r.get("gen_tokens_per_s"), r.get("train_time_s"), r.get("peak_mem_gib"),
             r.get("grad_norm"), r.get("steady_step_time_median_s")] for r in records]
    comparisons = []
    for name in shapes:
        trl = common.find(records, variant="trl", shape=name)
        cfg = hf_config_dict(name)
        settings = (f"Qwen3-{name} shape ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), random init, "
                    f"full-parameter GRPO, {args.num_prompts} prompts x {args.num_generations}, prompt ~"
                    f"{args.prompt_length} tok, max new {args.max_new_tokens}, T {TEMPERATURE} top-k {TOP_K} "
                    f"top-p {TOP_P}, mbs {args.micro_batch_size}, recompute {args.recompute}; first step after "
                    f"{args.warmup} light warm-up (TRL {args.trl_dtype} weights)")
        for variant in ("ours", "ours_vllm"):
            ours = common.find(records, variant=variant, shape=name)
            if ours is None:
                continue
            label = f"{settings}, {variant} [%s]"
            comparisons.append(common.comparison_row(reporter.env, label % "generation tokens/s", ours, trl,
                                                     metric="gen_tokens_per_s", unit="tok/s"))
            comparisons.append(common.comparison_row(reporter.env, label % "step time", ours, trl,
                                                     metric="step_time_s", unit="s", higher_is_better=False))
            if reporter.env.get("device") == "cuda":
                comparisons.append(common.comparison_row(reporter.env, label % "peak memory", ours, trl,
                                                         metric="peak_mem_gib", unit="GiB", higher_is_better=False))
    notes = [f"- {r['variant']} {r['shape']}: grad norm of the timed step is {r.get('grad_norm')} (not finite)"
             for r in records if r.get("status") == "ok" and not _finite(r.get("grad_norm"))]
    text = ("## GRPO step: ours (megatron or vLLM rollout + step) vs TRL GRPOTrainer\n\n"
            + common.markdown_table(["variant", "shape", "status", "step s", "gen s", "gen tokens", "gen tok/s",
                                     "train s", "peak GiB", "grad norm", "steady step s (ours)"], rows)
            + "\n" + common.markdown_table(common.PERFORMANCE_HEADER, comparisons)
            + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    path = reporter.write_markdown(text)
    return text + f"\n(written to {path} and {reporter.jsonl})\n"


def _finite(value) -> bool:
    try:
        return value is not None and float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    main()
