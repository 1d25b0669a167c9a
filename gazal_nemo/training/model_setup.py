"""Build the training model for this rank: Qwen3 stage, weights, adapter, megatron DDP.

Order matters: weights are loaded into the bare GPTModel, the adapter (if any) is applied
and the base frozen, and only then is the model wrapped in megatron's DDP, which makes
gradient buffers for the parameters that still require grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config, transformer_engine_available
from gazal_nemo.recipe_sections import ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class TrainModel:
    """What the training loop needs about the model on this rank."""

    shape: Qwen3Shape
    config: object  # megatron TransformerConfig
    chunks: list  # DDP-wrapped model chunks (one without virtual pipeline)
    use_te: bool


def check_precision(precision: PrecisionConfig) -> None:
    """FP8 needs Transformer Engine on a GPU: refuse before any work starts."""
    if precision.fp8 and not transformer_engine_available():
        raise ValueError("precision.fp8 is set but Transformer Engine with a GPU is not available; "
                         "install the `te` extra on an H100 node or set precision.fp8=null")


def build_stage_model(model_cfg: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                      train: TrainConfig, *, adapter_cfg=None, shape: Qwen3Shape | None = None):
    """The bare (unwrapped) model of this rank, weights loaded, adapter applied."""
    check_precision(precision)
    shape = shape or Qwen3Shape.from_pretrained(model_cfg.hf_path)
    shape.check_parallel(tp=parallel.tp, pp=parallel.pp)
    use_te = transformer_engine_available()
    config = transformer_config(
        shape, tp=parallel.tp, pp=parallel.pp, params_dtype=DTYPES[precision.dtype],
        recompute=None if train.recompute == "none" else train.recompute,
        fp8=precision.fp8, fp8_recipe=precision.fp8_recipe,
        sequence_parallel=parallel.sequence_parallel and parallel.tp > 1 and use_te,
        context_parallel_size=parallel.cp, calculate_per_token_loss=True,
    )
    model = build_qwen3(shape, config, use_te=use_te)
    if model_cfg.megatron_ckpt:
        from gazal_nemo.convert.dist_ckpt import load_model

        load_model(model, model_cfg.megatron_ckpt)
    else:
        from gazal_nemo.convert.load_hf import load_hf_weights

        load_hf_weights(model, model_cfg.hf_path, shape)
    if adapter_cfg is not None:
        from gazal_nemo.peft.dora import apply_adapter

        apply_adapter(model, adapter_cfg, shape, seed=train.seed)
    return shape, config, model, use_te


def wrap_ddp(model, config, parallel: ParallelConfig, precision: PrecisionConfig | None = None):
    """megatron DDP: grad buffers (fp32 unless precision.grad_reduce_in_fp32 is off), grads
    reduce-scattered for the distributed optimizer, overlapped with backward when dp > 1."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    precision = precision or PrecisionConfig()
    dp = ps.get_data_parallel_world_size(with_context_parallel=True)
    overlap_grad_reduce = dp > 1 if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32, overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather and parallel.distributed_optimizer and dp > 1,
        use_distributed_optimizer=parallel.distributed_optimizer, check_for_nan_in_grad=True,
    )
    return DistributedDataParallel(config, ddp_config, model)


def finish_param_gather(chunks) -> None:
    """With parallel.overlap_param_gather the updated params are all-gathered lazily in the
    next forward: anything that reads them right after a step (checkpoint save, export)
    must call this first. Does nothing when the overlap is off."""
    for chunk in chunks:
        if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
            chunk.start_param_sync(force_sync=True)


def build_train_model(model_cfg, parallel, precision, train, *, adapter_cfg=None) -> TrainModel:
    shape, config, model, use_te = build_stage_model(model_cfg, parallel, precision, train, adapter_cfg=adapter_cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train on this rank: every parameter is frozen")
    return TrainModel(shape=shape, config=config, chunks=[wrap_ddp(model, config, parallel, precision)], use_te=use_te)


def unwrap(chunk):
    """The GPTModel inside a DDP (or other) wrapper."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def adapter_norm_refresh(chunks):
    """after_step hook: DoRA weight norms are cached per optimizer step and go stale with it."""
    from gazal_nemo.peft.dora import invalidate_dora_norms

    return lambda: invalidate_dora_norms(chunks)
