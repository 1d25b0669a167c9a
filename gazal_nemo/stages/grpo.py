"""Stage 2: GRPO on multiple-choice questions (paper section 4, Appendix A.2 / B.2).

Each optimizer step: take `prompts_per_step` prompts (this data-parallel rank's share),
sample `num_generations` completions each with the rollout engine, score them with the
composite reward, normalise rewards within each prompt's group, and take one clipped
policy-gradient step through megatron's forward/backward schedule. The log-probs of the
trainer use the same temperature / top-k / top-p filter as the sampler.

What we left out, and why: no value model (GRPO's point); no reference model at beta 0
(the paper's setting; beta > 0 with an adapter uses the base model with the adapter off,
see `make_reference`). With one update per batch (num_iterations 1, as the paper
trains) the "old" policy is the current one: its log-probs are the detached log-probs of
the same forward, recomputed by the training model rather than taken from the sampler.
With `grpo.num_iterations` / `grpo.steps_per_generation` > 1 (TRL's off-policy reuse) a
rollout batch serves several optimizer steps; its old log-probs are then computed once,
before the first update, so the clip bounds act. Dynamic sampling, when on, lives in
rl/rollout_batch.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from gazal_nemo.config_io import to_dict
from gazal_nemo.eval.in_training import training_eval_hook
from gazal_nemo.inference.stopping import completion_text, stop_token_ids
from gazal_nemo.rl.rollout_batch import scored_rollout
from gazal_nemo.rl.rollout_plan import RolloutPlan, push_probe
from gazal_nemo.training.loop import maybe_resume, train_loop
from gazal_nemo.training.metrics import MetricsLogger
from gazal_nemo.training.model_setup import (
    adapter_norm_refresh,
    build_train_model,
    finish_param_gather,
    unwrap,
)
from gazal_nemo.training.optim import build_optimizer, build_scheduler


def build_microbatches(prompts, completions, advantages, *, micro_batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded prompt+completion rows; the completion mask marks positions whose next
    token is a generated one (what the loss sees)."""
    rows = []
    for completion, advantage in zip(completions, advantages.tolist()):
        prompt = prompts[completion.prompt_index].prompt_ids
        rows.append((prompt, completion, advantage))
    with_logprobs = all(c.logprobs is not None for _, c, _ in rows)
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        length = max(len(p) + len(c.tokens) for p, c, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length - 1), dtype=torch.bool)
        sampler = torch.zeros((len(chunk), length - 1), dtype=torch.float32)
        for row, (prompt, completion, _) in enumerate(chunk):
            seq = prompt + completion.tokens
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, len(prompt) - 1:len(seq) - 1] = True
            if with_logprobs:
                sampler[row, len(prompt) - 1:len(seq) - 1] = torch.tensor(completion.logprobs, dtype=torch.float32)
        batch = {
            "input_ids": ids, "completion_mask": mask,
            "advantages": torch.tensor([a for _, _, a in chunk], dtype=torch.float32),
            "truncated": torch.tensor([c.truncated for _, c, _ in chunk], dtype=torch.bool),
        }
        if with_logprobs:
            batch["sampler_logprobs"] = sampler  # [B, S-1], aligned with completion_mask
        batches.append(batch)
    return batches


def train_filters(sampling) -> tuple[int, float]:
    """(top_k, top_p) of the distribution the trainer's log-probs use (sampling.train_logprobs)."""
    if sampling.train_logprobs == "filtered":
        return sampling.top_k, sampling.top_p
    return 0, 1.0


def make_forward_step(recipe):
    """megatron forward-step: logits -> filtered log-probs -> clipped surrogate loss."""
    from gazal_nemo.inference.sampling import vocab_parallel_token_entropy, vocab_parallel_token_logprobs
    from gazal_nemo.rl.loss import grpo_loss

    sampling, loss_cfg = recipe.grpo.sampling, recipe.grpo.loss

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
        logits = model(ids, positions, None)

        def loss_func(logits_BSV):
            shifted = logits_BSV[:, :-1]
            targets = ids[:, 1:]
            temperature, (top_k, top_p) = sampling.temperature, train_filters(sampling)
            logprobs = vocab_parallel_token_logprobs(shifted, targets, temperature, top_k, top_p)
            with torch.no_grad():
                entropy = vocab_parallel_token_entropy(shifted.detach(), temperature, top_k, top_p)
            mask = batch["completion_mask"].to(device)

            def optional(key):
                return batch[key].to(device) if key in batch else None

            old = optional("old_logprobs")
            loss, metrics = grpo_loss(
                logprobs=logprobs, old_logprobs=logprobs.detach() if old is None else old,
                advantages=batch["advantages"].to(device), completion_mask=mask,
                truncated=batch["truncated"].to(device), config=loss_cfg, num_global_tokens=1, entropy=entropy,
                ref_logprobs=optional("ref_logprobs"),
                sampler_logprobs=optional("sampler_logprobs"),
            )
            return _megatron_loss(loss, metrics, mask, loss_cfg.normalisation)

        return logits, loss_func

    return forward_step


def _megatron_loss(loss, metrics, mask, normalisation):
    """(value, count, report) so megatron's per-token normalisation yields the chosen one:
    bnpo -> mean of micro-batch means; dapo -> token sum over the global token count;
    grpo -> sequence-mean sum over the global sequence count."""
    tokens = metrics["num_loss_tokens"]
    if normalisation == "bnpo":
        value, count = loss, torch.ones((), dtype=torch.int)
    elif normalisation == "dapo":
        value, count = loss, tokens.to(torch.int)  # loss is the token sum (num_global_tokens=1)
    else:
        sequences = (mask.sum(dim=-1) > 0).sum()
        value, count = loss * sequences.clamp(min=1), sequences.to(torch.int)
    report = {"loss": torch.stack([loss.detach().float(), torch.ones(())])}
    for key in ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy", "kl_ref", "tis_weight_mean",
                "tis_capped_frac", "mis_masked_frac", "kl_sampler"):
        if key in metrics:
            report[key] = torch.stack([metrics[key] * tokens, tokens])
    return value, count, report


def reference_logprobs(reference, microbatches: list[dict], sampling, *, micro_batch_size: int,
                      key: str = "ref_logprobs") -> None:
    """Add `key` [B, S-1] log-probs to each micro-batch (last pipeline stage), filtered like the policy.

    `reference` is a callable context: entering it yields the model chunks to run, e.g.
    the training model with its adapters switched off, a frozen copy of the start, or the
    policy itself before the first update of a reused batch (key "old_logprobs").
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gazal_nemo.inference.sampling import vocab_parallel_token_logprobs

    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        logits = model(ids, torch.arange(ids.shape[1], device=device).expand_as(ids), None)

        def loss_func(logits_BSV):
            collected.append(vocab_parallel_token_logprobs(
                logits_BSV[:, :-1], ids[:, 1:], sampling.temperature, *train_filters(sampling)).cpu())
            return logits_BSV.sum() * 0, torch.ones((), dtype=torch.int), {}

        return logits, loss_func

    with reference() as chunks, torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
            num_microbatches=len(microbatches), seq_length=max(mb["input_ids"].shape[1] for mb in microbatches),
            micro_batch_size=micro_batch_size, forward_only=True)
    for batch, logprobs in zip(microbatches, collected):
        batch[key] = logprobs


def make_reference(recipe, tm, adapter_cfg):
    """The KL reference for beta > 0: adapters off (no copy) or a frozen copy of the start."""
    import contextlib

    if recipe.grpo.loss.beta == 0:
        return None
    if adapter_cfg is not None:
        from gazal_nemo.peft.dora import adapters_disabled

        @contextlib.contextmanager
        def base_model():
            with adapters_disabled(unwrap(tm.chunks[0])):
                yield tm.chunks
        return base_model
    from gazal_nemo.training.model_setup import build_stage_model

    _, _, frozen, _ = build_stage_model(recipe.model, recipe.parallel, recipe.precision, recipe.train, shape=tm.shape)
    frozen.requires_grad_(False)
    frozen.eval()

    @contextlib.contextmanager
    def frozen_copy():
        yield [frozen]
    return frozen_copy


def run_grpo(recipe, shape, *, bridge=None) -> dict:
    """The GRPO stage on this trainer rank; `bridge` (rl/async_bridge.py) when the rollouts come
    from generator ranks (grpo.rollout.mode=async), else the policy engine is built here."""
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from gazal_nemo.inference.registry import PolicyContext, build_policy_engine
    from gazal_nemo.rl.rewards import build_rewards
    from gazal_nemo.rl.rollout_log import RolloutLog, TrainedPromptsLog
    from gazal_nemo.tasks.mcq import load_mcq_prompts

    grpo, train = recipe.grpo, recipe.train
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    prompts, report = load_mcq_prompts(grpo.data, tokenizer)
    if dist.get_rank() == 0:
        print(report.summary(), flush=True)
    rewards = build_rewards(grpo.rewards)  # plug-ins fail here, before the model is built
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    if grpo.prompts_per_step % dp_size:
        raise ValueError(f"grpo.prompts_per_step={grpo.prompts_per_step} must divide by data-parallel size {dp_size}")
    # A rollout batch feeds steps_per_generation slices of prompts_per_step prompts, each trained
    # num_iterations times: one generation per `steps_per_batch` optimizer steps.
    plan = RolloutPlan.build(prompts, grpo, train, dp_size=dp_size)
    steps_per_batch, total_steps = plan.steps_per_batch, plan.total_steps(train)

    adapter_cfg = recipe.adapter if grpo.train_adapter else None
    if grpo.train_adapter and adapter_cfg is None:
        raise ValueError("grpo.train_adapter is true but the recipe has no adapter section")
    tm = build_train_model(recipe.model, recipe.parallel, recipe.precision, train, adapter_cfg=adapter_cfg)
    optimizer = build_optimizer(tm.chunks, recipe.optim, recipe.precision, distributed=recipe.parallel.distributed_optimizer)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps=total_steps)
    start_step, resumed = maybe_resume(recipe.checkpoint, chunks=tm.chunks, optimizer=optimizer, scheduler=scheduler,
                                       recipe_dict=to_dict(recipe))
    tm.config.variable_seq_lengths = True  # micro-batches are as long as their longest completion
    reference = make_reference(recipe, tm, adapter_cfg)
    stop_ids = stop_token_ids(tokenizer)
    policy = unwrap(tm.chunks[0])
    probe = push_probe(prompts[0].prompt_ids, tokenizer, stop_ids, multiple_of=recipe.parallel.tp)
    engine, rollouts = None, None
    if bridge is None:
        engine = build_policy_engine(grpo.rollout.engine, PolicyContext(
            model=policy, shape=tm.shape, hf_dir=recipe.model.hf_path, tp=recipe.parallel.tp, dp=dp_size,
            dtype=recipe.precision.dtype, seed=train.seed, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
            max_model_len=grpo.data.max_prompt_length + grpo.sampling.max_new_tokens, probe=probe), grpo.rollout)
    else:
        from gazal_nemo.stages.grpo_async import AsyncRollouts, pieces_per_share

        replicas = grpo.rollout.generator_ranks // grpo.rollout.generator_tp
        rollouts = AsyncRollouts(bridge=bridge, chunks=tm.chunks, policy=policy, shape=tm.shape, probe=probe,
                                 bucket_bytes=grpo.rollout.vllm.weight_sync_bucket_mb << 20,
                                 max_staleness=grpo.rollout.max_staleness, dp_rank=dp_rank,
                                 data_index=lambda step: guard.data_step(step) if guard is not None else step,
                                 pieces=pieces_per_share(replicas, dp_size))
    rollout_log = RolloutLog(recipe.logging.dir, every=grpo.log_rollouts_every, groups=grpo.log_rollouts_groups,
                             enabled=dist.get_rank() == 0, resume_step=start_step)
    trained_log = TrainedPromptsLog(recipe.logging.dir, enabled=dist.get_rank() == 0, resume_step=start_step)
    step_metrics: dict = {}
    current: dict = {}  # the rollout batch in use: its index and its per-slice micro-batches

    def sync_policy(step: int) -> dict:
        """The engine generates with the weights after `step` optimizer steps (a push for vLLM)."""
        if engine.policy_version == step:
            return {}
        finish_param_gather(tm.chunks)  # a push reads every parameter: none may be mid-gather
        return {key: (value, 1.0) for key, value in engine.sync_weights(step).metrics().items()}

    def rollout_slices(index: int, step: int) -> list[list[dict]]:
        if rollouts is None:
            pushed = sync_policy(step)
            scored = scored_rollout(engine, plan.share(index, dp_rank), index=index, recipe=recipe, rewards=rewards,
                                     all_prompts=prompts, dp_rank=dp_rank,
                                     decode=lambda tokens: completion_text(tokenizer, tokens, stop_ids))
            engine.release_memory()  # the trainer's turn
        else:
            scored, pushed = rollouts.batch(step)
            pushed.update(_staleness_counts(scored, step, grpo.rollout.max_staleness))
        step_metrics.clear()
        step_metrics.update(scored.stats, **pushed)
        step_metrics["samples/prompt_too_long"] = (float(_count_prompts_too_long(scored)), 1.0)
        if dp_rank == 0:
            rollout_log.maybe_write(step + 1, scored)
        trained_log.write(step + 1, [getattr(p, "row", None) for p in scored.prompts],
                          group=ps.get_data_parallel_group(with_context_parallel=True))
        slices = _split_microbatches(scored, grpo.steps_per_generation, grpo.sampling.num_generations,
                                     micro_batch_size=train.micro_batch_size, pad_id=tokenizer.pad_token_id)
        every = [mb for microbatches in slices for mb in microbatches]
        if reference is not None:
            reference_logprobs(reference, every, grpo.sampling, micro_batch_size=train.micro_batch_size)
        if steps_per_batch > 1:  # old log-probs once, before the first update of this batch
            reference_logprobs(_policy_in_eval(tm.chunks), every, grpo.sampling,
                               micro_batch_size=train.micro_batch_size, key="old_logprobs")
        return slices

    def microbatches_for_step(step: int) -> list[dict]:
        index, within = divmod(guard.data_step(step) if guard is not None else step, steps_per_batch)
        if current.get("index") != index:
            if within and dist.get_rank() == 0:
                print(f"grpo: resumed inside rollout batch {index}: regenerating it with the current policy "
                      f"for its remaining {steps_per_batch - within} step(s)", flush=True)
            current.update(index=index, slices=rollout_slices(index, step))
        return current["slices"][within % grpo.steps_per_generation]

    logger = MetricsLogger(recipe.logging.dir, total_steps=total_steps, tensorboard=recipe.logging.tensorboard,
                           enabled=dist.get_rank() == 0, resume_step=start_step)
    guard = _build_guard(recipe, resumed, start_step, scheduler, rewards)
    after_step = None
    if adapter_cfg is not None:
        after_step = adapter_norm_refresh(tm.chunks)
        after_step()
    try:
        result = train_loop(
            chunks=tm.chunks, config=tm.config, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
            microbatches_for_step=microbatches_for_step, forward_step=make_forward_step(recipe),
            seq_length=train.seq_length, micro_batch_size=train.micro_batch_size, ckpt_cfg=recipe.checkpoint,
            logger=logger, recipe_dict=to_dict(recipe), start_step=start_step, log_every=recipe.logging.log_every,
            stop_after=None if train.stop_at_step is None else max(train.stop_at_step - start_step, 0),
            tokens_for_step=lambda mbs: sum(int(mb["input_ids"].numel()) for mb in mbs) * dp_size,
            after_step=after_step, extra_metrics=lambda: _global_means(step_metrics), guard=guard,
            evaluate=training_eval_hook(recipe.eval_during_training, model=policy, tokenizer=tokenizer,
                                        total_steps=total_steps, engine=engine,
                                        before_generate=sync_policy if engine is not None else None),
        )
        logger.close()
        rollout_log.close()
        trained_log.close()
        if recipe.export_dir and result.last_step == total_steps:
            from gazal_nemo.stages.export import export_trained_model

            export_trained_model(recipe, shape, tm.chunks)
    finally:
        (engine or rollouts).close()
    return {"history": result.history, "total_steps": total_steps, "stopped_by": result.stopped_by, "last_step": result.last_step}


def _build_guard(recipe, resumed_state: dict, start_step: int, scheduler, rewards):
    """The collapse guard (grpo.guard) for this run, continuing a resumed run's state: its data
    offset and learning-rate scale from the checkpoint, its memory from the logged rows."""
    from gazal_nemo.rl.guard import RollbackGuard, apply_lr_scale, watched_rules

    config = recipe.grpo.guard
    if not config.enabled:
        return None
    weights = {reward.name: reward.weight for reward in rewards}  # what the recipe rewards
    history = [None]
    if dist.get_rank() == 0 and start_step:
        from gazal_nemo.training.metrics import read_metrics_jsonl

        history = [read_metrics_jsonl(Path(recipe.logging.dir) / "metrics.jsonl", through_step=start_step)]
    dist.broadcast_object_list(history, src=0)  # every rank must judge alike
    guard = RollbackGuard(config, watched_rules(config, weights), checkpoint_dir=recipe.checkpoint.dir,
                          events_dir=recipe.logging.dir, saved_state=resumed_state, history=history[0])
    apply_lr_scale(scheduler, guard.lr_scale)  # scales from earlier rollbacks of this run
    return guard


def _split_microbatches(scored, num_slices: int, num_generations: int, *, micro_batch_size: int,
                        pad_id: int) -> list[list[dict]]:
    """The batch's groups in `num_slices` equal slices (one per optimizer step), as micro-batches."""
    from gazal_nemo.rl.rollout_batch import select_groups

    per_slice = scored.num_groups // num_slices
    slices = []
    for k in range(num_slices):
        part = select_groups(scored, range(k * per_slice, (k + 1) * per_slice), num_generations)
        slices.append(build_microbatches(part.prompts, part.completions, part.advantages.advantages,
                                         micro_batch_size=micro_batch_size, pad_id=pad_id))
    return slices


def _policy_in_eval(chunks):
    """Reference-style context for the policy itself, dropout off (old log-probs of a reused batch)."""
    import contextlib

    @contextlib.contextmanager
    def policy():
        modes = [c.training for c in chunks]
        for c in chunks:
            c.eval()
        try:
            yield chunks
        finally:
            for c, mode in zip(chunks, modes):
                c.train(mode)
    return policy


def _staleness_counts(scored, step: int, max_staleness: int) -> dict:
    """samples/staleness_<n>: completions trained at step+1 (weights version `step`) that were
    sampled n versions earlier; a sample older than the bound is a bug, not a statistic."""
    counts: dict[int, int] = {}
    for completion in scored.completions:
        lag = step - completion.policy_version
        if not 0 <= lag <= max_staleness:
            raise RuntimeError(f"asynchronous rollouts: a completion of policy version {completion.policy_version} "
                               f"reached training step {step + 1} (grpo.rollout.max_staleness={max_staleness})")
        counts[lag] = counts.get(lag, 0) + 1
    return {f"samples/staleness_{lag}": (float(n), 1.0) for lag, n in counts.items()}


def _count_prompts_too_long(scored) -> int:
    """Completions the engine could not start (prompt longer than its context), named once per batch."""
    from gazal_nemo.inference.protocol import FINISH_PROMPT_TOO_LONG

    rows = sorted({getattr(scored.prompts[c.prompt_index], "row", c.prompt_index) for c in scored.completions
                   if c.finish_reason == FINISH_PROMPT_TOO_LONG})
    if rows:
        print(f"grpo: rank {dist.get_rank()}: {len(rows)} prompt(s) do not fit the rollout engine's context "
              f"(data rows {rows[:10]}): scored as unanswered, nothing to train on", flush=True)
    return sum(c.finish_reason == FINISH_PROMPT_TOO_LONG for c in scored.completions)


def _global_means(step_metrics: dict) -> dict:
    from megatron.core import parallel_state as ps

    from gazal_nemo.rl.guard_signals import finish_signals

    group = ps.get_data_parallel_group(with_context_parallel=True)
    out = {}
    for key, (value, count) in sorted(step_metrics.items()):
        if count < 0:
            t = torch.tensor([value])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            out[key] = t.item()
            continue
        t = torch.tensor([value, count], dtype=torch.float64)
        dist.all_reduce(t, group=group)
        summed = key in ("zero_adv_groups", "gen_tokens_per_s") or (key.startswith("dynamic/") and key != "dynamic/rounds")
        summed = summed or key.startswith("samples/")
        out[key] = t[0].item() if summed else (t[0] / t[1]).item()
    return finish_signals(out)  # the guard's signals that need every rank's counts
