"""Optimizer and LR schedule on megatron-core.

megatron builds the mixed-precision / distributed (ZeRO-1) wrapper around an Adam it
chooses itself. EXAdam is elementwise with Adam's two state tensors, so we let megatron
build its wrapper and then swap the inner torch optimizer for EXAdam over the very same
param groups (the fp32 main-param shards under the distributed optimizer). megatron's
state save/load then handles EXAdam's `exp_avg`/`exp_avg_sq` exactly as Adam's.
"""

from __future__ import annotations

import math

import torch

from gazal_nemo.recipe_sections import OptimConfig, PrecisionConfig


def inner_optimizers(megatron_optimizer) -> list:
    """megatron's per-group wrappers that hold a torch optimizer (over this rank's fp32
    main-param shards); a wrapper over no trainable params holds None and is left out."""
    wrappers = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    return [w for w in wrappers if getattr(w, "optimizer", None) is not None]


def build_optimizer(model_chunks, optim: OptimConfig, precision: PrecisionConfig, *, distributed: bool):
    """megatron optimizer (distributed or not) whose inner update rule is `optim.name`."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.grad_clip,
        bf16=precision.dtype == "bf16",
        fp16=precision.dtype == "fp16",
        params_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision.dtype],
        use_distributed_optimizer=distributed,
    )
    megatron_optimizer = get_megatron_optimizer(config, model_chunks)
    if optim.name == "exadam":
        for wrapper in inner_optimizers(megatron_optimizer):
            wrapper.optimizer = _exadam_over(wrapper.optimizer.param_groups, optim)
    return megatron_optimizer


def _exadam_over(param_groups: list[dict], optim: OptimConfig):
    """EXAdam over megatron's own param groups (the distributed optimizer's main-param shards
    are views, which torch's constructor refuses; from_param_groups takes them over)."""
    from gazal_nemo.optim.exadam import ExAdam

    return ExAdam.from_param_groups(param_groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                    weight_decay=optim.weight_decay,
                                    step_size_schedule=optim.exadam_step_size_schedule)


def build_scheduler(megatron_optimizer, optim: OptimConfig, *, total_steps: int):
    """Linear warmup then cosine decay (SFT) or constant (GRPO), stepped once per optimizer step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = int(math.ceil(optim.warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        megatron_optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style="cosine" if optim.schedule == "cosine" else "constant",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def current_lr(megatron_optimizer) -> float:
    for group in megatron_optimizer.param_groups:
        return float(group["lr"])
    return 0.0
