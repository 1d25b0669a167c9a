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
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from gazal_nemo.config_io import to_dict
from gazal_nemo.rl.stopping import completion_text, stop_token_ids
from gazal_nemo.training.loop import maybe_resume, train_loop
from gazal_nemo.training.metrics import MetricsLogger
from gazal_nemo.training.model_setup import adapter_norm_refresh, build_train_model, unwrap
from gazal_nemo.training.optim import build_optimizer, build_scheduler


def build_microbatches(prompts, completions, advantages, *, micro_batch_size: int, pad_id: int) -> list[dict]:
    """Right-padded prompt+completion rows; the completion mask marks positions whose next
    token is a generated one (what the loss sees)."""
    rows = []
    for completion, advantage in zip(completions, advantages.tolist()):
        prompt = prompts[completion.prompt_index].prompt_ids
        rows.append((prompt, completion.tokens, advantage, completion.truncated))
    batches = []
    for start in range(0, len(rows), micro_batch_size):
        chunk = rows[start:start + micro_batch_size]
        length = max(len(p) + len(c) for p, c, _, _ in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length - 1), dtype=torch.bool)
        for row, (prompt, tokens, _, _) in enumerate(chunk):
            seq = prompt + tokens
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, len(prompt) - 1:len(seq) - 1] = True
        batches.append({
            "input_ids": ids, "completion_mask": mask,
            "advantages": torch.tensor([a for _, _, a, _ in chunk], dtype=torch.float32),
            "truncated": torch.tensor([t for _, _, _, t in chunk], dtype=torch.bool),
        })
    return batches


def make_forward_step(recipe):
    """megatron forward-step: logits -> filtered log-probs -> clipped surrogate loss."""
    from gazal_nemo.rl.loss import grpo_loss
    from gazal_nemo.rl.sampling import vocab_parallel_token_entropy, vocab_parallel_token_logprobs

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
            temperature = sampling.temperature
            logprobs = vocab_parallel_token_logprobs(shifted, targets, temperature, sampling.top_k, sampling.top_p)
            with torch.no_grad():
                entropy = vocab_parallel_token_entropy(shifted.detach(), temperature, sampling.top_k, sampling.top_p)
            mask = batch["completion_mask"].to(device)
            ref = batch.get("ref_logprobs")
            loss, metrics = grpo_loss(
                logprobs=logprobs, old_logprobs=logprobs.detach(), advantages=batch["advantages"].to(device),
                completion_mask=mask, truncated=batch["truncated"].to(device), config=loss_cfg,
                num_global_tokens=1, entropy=entropy, ref_logprobs=None if ref is None else ref.to(device),
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
    for key in ("clip_fraction_low", "clip_fraction_high", "ratio_mean", "entropy", "kl_ref"):
        if key in metrics:
            report[key] = torch.stack([metrics[key] * tokens, tokens])
    return value, count, report


def reference_logprobs(reference, microbatches: list[dict], sampling, *, micro_batch_size: int) -> None:
    """Add `ref_logprobs` [B, S-1] to each micro-batch (last pipeline stage), filtered like the policy.

    `reference` is a callable context: entering it yields the model chunks to run, e.g.
    the training model with its adapters switched off, or a frozen copy of the start.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gazal_nemo.rl.sampling import vocab_parallel_token_logprobs

    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        device = next(model.parameters()).device
        ids = batch["input_ids"].to(device)
        logits = model(ids, torch.arange(ids.shape[1], device=device).expand_as(ids), None)

        def loss_func(logits_BSV):
            collected.append(vocab_parallel_token_logprobs(
                logits_BSV[:, :-1], ids[:, 1:], sampling.temperature, sampling.top_k, sampling.top_p).cpu())
            return logits_BSV.sum() * 0, torch.ones((), dtype=torch.int), {}

        return logits, loss_func

    with reference() as chunks, torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
            num_microbatches=len(microbatches), seq_length=max(mb["input_ids"].shape[1] for mb in microbatches),
            micro_batch_size=micro_batch_size, forward_only=True)
    for batch, logprobs in zip(microbatches, collected):
        batch["ref_logprobs"] = logprobs


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


def run_grpo(recipe, shape) -> dict:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    from gazal_nemo.data.mcq import load_mcq_prompts
    from gazal_nemo.rl.advantages import group_advantages
    from gazal_nemo.rl.rewards import build_rewards, reward_inputs, score_completions
    from gazal_nemo.rl.rollout import MegatronRolloutEngine

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
    steps_per_epoch = len(prompts) // grpo.prompts_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"{len(prompts)} prompts, fewer than grpo.prompts_per_step={grpo.prompts_per_step}")
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    per_rank = grpo.prompts_per_step // dp_size
    order_gen = torch.Generator().manual_seed(train.seed)
    orders = [torch.randperm(len(prompts), generator=order_gen).tolist() for _ in range(train.epochs)]

    adapter_cfg = recipe.adapter if grpo.train_adapter else None
    if grpo.train_adapter and adapter_cfg is None:
        raise ValueError("grpo.train_adapter is true but the recipe has no adapter section")
    tm = build_train_model(recipe.model, recipe.parallel, recipe.precision, train, adapter_cfg=adapter_cfg)
    optimizer = build_optimizer(tm.chunks, recipe.optim, recipe.precision, distributed=recipe.parallel.distributed_optimizer)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps=total_steps)
    start_step, _ = maybe_resume(recipe.checkpoint, chunks=tm.chunks, optimizer=optimizer, scheduler=scheduler,
                                 recipe_dict=to_dict(recipe))
    tm.config.variable_seq_lengths = True  # micro-batches are as long as their longest completion
    reference = make_reference(recipe, tm, adapter_cfg)
    stop_ids = stop_token_ids(tokenizer)
    engine = MegatronRolloutEngine(unwrap(tm.chunks[0]), stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                   max_batch_size=grpo.rollout.max_batch_size,
                                   use_kv_cache=grpo.rollout.engine != "torch")
    if grpo.rollout.engine == "vllm":
        from gazal_nemo.rl.vllm_engine import VLLMRolloutEngine

        engine = VLLMRolloutEngine.from_recipe(recipe, unwrap(tm.chunks[0]), shape, stop_ids)
    step_metrics: dict = {}

    def microbatches_for_step(step: int) -> list[dict]:
        epoch, within = divmod(step, steps_per_epoch)
        start = within * grpo.prompts_per_step + dp_rank * per_rank
        step_prompts = [prompts[i] for i in orders[epoch][start:start + per_rank]]
        repeated = [p.prompt_ids for p in step_prompts for _ in range(grpo.sampling.num_generations)]
        # Same seed on the ranks of one TP group, different across data-parallel ranks.
        seed = train.seed * 1_000_003 + step * 1009 + dp_rank
        t0 = time.time()
        completions = engine.generate(repeated, max_new_tokens=grpo.sampling.max_new_tokens,
                                      temperature=grpo.sampling.temperature, top_k=grpo.sampling.top_k,
                                      top_p=grpo.sampling.top_p, seed=seed)
        gen_time = time.time() - t0
        for c in completions:  # generate() saw each prompt repeated; point back at the prompt
            c.prompt_index //= grpo.sampling.num_generations
        texts = [completion_text(tokenizer, c.tokens, stop_ids) for c in completions]
        lengths = [len(c.tokens) for c in completions]
        truncated = [c.truncated for c in completions]
        scores = score_completions(
            reward_inputs(completions=texts, num_tokens=lengths, truncated=truncated, prompts=step_prompts,
                          num_generations=grpo.sampling.num_generations),
            rewards, combine=grpo.rewards.combine)
        adv = group_advantages(scores.total, num_generations=grpo.sampling.num_generations,
                               scale_by_std=grpo.loss.scale_advantages_by_std, eps=grpo.loss.advantage_eps)
        step_metrics.clear()
        step_metrics.update(_rollout_metrics(scores, adv, lengths, truncated, gen_time))
        microbatches = build_microbatches(step_prompts, completions, adv.advantages,
                                          micro_batch_size=train.micro_batch_size, pad_id=tokenizer.pad_token_id)
        if reference is not None:
            reference_logprobs(reference, microbatches, grpo.sampling, micro_batch_size=train.micro_batch_size)
        return microbatches

    logger = MetricsLogger(recipe.logging.dir, total_steps=total_steps, tensorboard=recipe.logging.tensorboard,
                           enabled=dist.get_rank() == 0, resume_step=start_step)
    after_step = None
    if adapter_cfg is not None:
        after_step = adapter_norm_refresh(tm.chunks)
        after_step()
    result = train_loop(
        chunks=tm.chunks, config=tm.config, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
        microbatches_for_step=microbatches_for_step, forward_step=make_forward_step(recipe),
        seq_length=train.seq_length, micro_batch_size=train.micro_batch_size, ckpt_cfg=recipe.checkpoint,
        logger=logger, recipe_dict=to_dict(recipe), start_step=start_step, log_every=recipe.logging.log_every,
        stop_after=None if train.stop_at_step is None else max(train.stop_at_step - start_step, 0),
        tokens_for_step=lambda mbs: sum(int(mb["input_ids"].numel()) for mb in mbs) * dp_size,
        after_step=after_step, extra_metrics=lambda: _global_means(step_metrics),
    )
    logger.close()
    if recipe.export_dir and result.last_step == total_steps:
        from gazal_nemo.stages.export import export_trained_model

        export_trained_model(recipe, shape, tm.chunks)
    return {"history": result.history, "total_steps": total_steps, "stopped_by": result.stopped_by}


def _rollout_metrics(scores, adv, lengths, truncated, gen_time) -> dict:
    """Sums and counts (reduced over data-parallel ranks before logging)."""
    n = float(len(lengths))
    out = {f"reward/{name}": (float(v.sum()), n) for name, v in scores.per_reward.items()}
    out["reward/total"] = (float(scores.total.sum()), n)
    out["completion_len_mean"] = (float(sum(lengths)), n)
    out["truncated_frac"] = (float(sum(truncated)), n)
    out["zero_adv_groups"] = (float(adv.num_zero_std_groups), 1.0)
    out["completion_len_max"] = (float(max(lengths) if lengths else 0), -1.0)  # -1: reduce by max
    out["gen_tokens_per_s"] = (float(sum(lengths)) / max(gen_time, 1e-9), 1.0)
    return out


def _global_means(step_metrics: dict) -> dict:
    from megatron.core import parallel_state as ps

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
        out[key] = (t[0] / t[1]).item() if key not in ("zero_adv_groups", "gen_tokens_per_s") else t[0].item()
    return out
