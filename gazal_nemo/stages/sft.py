"""Stage 1: SFT with a DoRA + rsLoRA adapter (paper section 3, Appendix A.1).

Packed samples are made identically on every rank (deterministic by seed), split into
global batches of `train.global_batch_size`, and each data-parallel rank takes its slice
as micro-batches. The loss is the token-level cross entropy over assistant tokens only,
normalised by the number of loss tokens in the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gazal_nemo.config_io import to_dict
from gazal_nemo.eval.in_training import training_eval_hook
from gazal_nemo.training.loop import maybe_resume, train_loop
from gazal_nemo.training.metrics import MetricsLogger, device_peak_tflops, train_flops_per_token
from gazal_nemo.training.model_setup import adapter_norm_refresh, build_train_model, unwrap
from gazal_nemo.training.optim import build_optimizer, build_scheduler


def build_packed_samples(recipe, tokenizer):
    """Tokenised, masked and packed SFT samples (the same on every rank); prints the data report."""
    from gazal_nemo.data.sft import build_sft_dataset

    if recipe.sft_data.max_length != recipe.train.seq_length:
        raise ValueError(f"sft_data.max_length={recipe.sft_data.max_length} must equal "
                         f"train.seq_length={recipe.train.seq_length} (samples are packed to that length)")
    dataset, report = build_sft_dataset(recipe.sft_data, tokenizer)
    if dist.get_rank() == 0:
        print(report.summary() if hasattr(report, "summary") else report, flush=True)
    return dataset


def collate(samples: list[dict], seq_length: int, *, use_te: bool) -> dict:
    """One micro-batch: [B, S] tensors plus the document layout for attention.

    Transformer Engine takes packed documents as THD with cu_seqlens (the batch flattened
    to one row); the torch spec takes a block-diagonal causal mask.
    """
    from gazal_nemo.data.packing import block_causal_attention_mask, collate_packed, thd_packed_seq_params

    batch = collate_packed(samples)
    cu_seqlens = batch.pop("cu_seqlens")
    if use_te:
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        batch["packed_seq_params"] = thd_packed_seq_params(cu_seqlens, seq_length)
        batch["attention_mask"] = None
    else:
        batch["attention_mask"] = block_causal_attention_mask(cu_seqlens, seq_length)
    return batch


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sft_forward_step(data_iterator, model):
    batch = _to_device(next(data_iterator), next(model.parameters()).device)
    extra = {"packed_seq_params": batch["packed_seq_params"]} if "packed_seq_params" in batch else {}
    per_token_loss = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                           labels=batch["labels"], **extra)

    def loss_func(per_token_loss_BS):
        mask = batch["loss_mask"].float()
        loss_sum = (per_token_loss_BS.float() * mask).sum()
        num_tokens = mask.sum().to(torch.int)
        return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), mask.sum()])}

    return per_token_loss, loss_func


def run_sft(recipe, shape) -> dict:
    """Train, checkpoint, export; returns the step history (rank 0's view)."""
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    samples = build_packed_samples(recipe, tokenizer)
    train = recipe.train
    dp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    dp_rank = ps.get_data_parallel_rank(with_context_parallel=True)
    steps_per_epoch = len(samples) // train.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"sft_data gives {len(samples)} packed samples, fewer than one global batch "
                         f"(train.global_batch_size={train.global_batch_size})")
    total_steps = steps_per_epoch * train.epochs
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)
    generator = torch.Generator().manual_seed(train.seed)
    orders = [torch.randperm(len(samples), generator=generator).tolist() for _ in range(train.epochs)]
    per_rank = train.global_batch_size // dp_size

    def microbatches_for_step(step: int) -> list[dict]:
        epoch, within = divmod(step, steps_per_epoch)
        start = within * train.global_batch_size + dp_rank * per_rank
        picked = [samples[i] for i in orders[epoch][start:start + per_rank]]
        return [collate(picked[i:i + train.micro_batch_size], train.seq_length, use_te=tm.use_te)
                for i in range(0, len(picked), train.micro_batch_size)]

    tm = build_train_model(recipe.model, recipe.parallel, recipe.precision, train, adapter_cfg=recipe.adapter)
    optimizer = build_optimizer(tm.chunks, recipe.optim, recipe.precision, distributed=recipe.parallel.distributed_optimizer)
    scheduler = build_scheduler(optimizer, recipe.optim, total_steps=total_steps)
    start_step, _ = maybe_resume(recipe.checkpoint, chunks=tm.chunks, optimizer=optimizer, scheduler=scheduler,
                                 recipe_dict=to_dict(recipe))
    after_step = adapter_norm_refresh(tm.chunks) if recipe.adapter is not None else None
    if after_step is not None:
        after_step()  # resumed adapter weights: norms must be recomputed
    logger = MetricsLogger(recipe.logging.dir, total_steps=total_steps, tensorboard=recipe.logging.tensorboard,
                           enabled=dist.get_rank() == 0, resume_step=start_step)
    num_params = sum(p.numel() for p in unwrap(tm.chunks[0]).parameters()) * recipe.parallel.tp * recipe.parallel.pp
    result = train_loop(
        chunks=tm.chunks, config=tm.config, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
        microbatches_for_step=microbatches_for_step, forward_step=sft_forward_step, seq_length=train.seq_length,
        micro_batch_size=train.micro_batch_size, ckpt_cfg=recipe.checkpoint, logger=logger,
        recipe_dict=to_dict(recipe), start_step=start_step, log_every=recipe.logging.log_every,
        stop_after=None if train.stop_at_step is None else max(train.stop_at_step - start_step, 0),
        tokens_for_step=lambda mbs: sum(int(mb["loss_mask"].numel()) for mb in mbs) * dp_size,
        flops_per_token=train_flops_per_token(num_params=num_params, num_layers=shape.num_layers,
                                              hidden=shape.hidden_size, seq_length=train.seq_length,
                                              recompute=train.recompute == "full"),
        peak_tflops=device_peak_tflops(), after_step=after_step,
        evaluate=training_eval_hook(recipe.eval_during_training, model=unwrap(tm.chunks[0]), tokenizer=tokenizer,
                                    total_steps=total_steps),
    )
    logger.close()
    if recipe.export_dir and result.last_step == total_steps:
        from gazal_nemo.stages.export import export_trained_model

        export_trained_model(recipe, shape, tm.chunks)
    return {"history": result.history, "total_steps": total_steps, "checkpoint": result.checkpoint,
            "num_samples": len(samples), "steps_per_epoch": steps_per_epoch, "stopped_by": result.stopped_by,
            "last_step": result.last_step}
