"""Optimizer and LR schedule on megatron-core.

megatron builds the mixed-precision / distributed (ZeRO-1) wrapper around an Adam it
chooses itself. EXAdam is elementwise with Adam's two state tensors, so we let megatron
build its wrapper and then swap the inner torch optimizer for EXAdam over the very same
param groups (the fp32 main-param shards under the distributed optimizer). megatron's
state save/load then handles EXAdam's `exp_avg`/`exp_avg_sq` exactly as Adam's.
"""

from __future__ import annotations

import gc
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

    check_cpu_offload(optim, distributed=distributed)
    offload = optim.cpu_offload_fraction > 0
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
        # Offload as megatron-LM runs it: the precision-aware path hands the optimizer the
        # 16-bit shards, so the fp32 main params live on the host with the moments (without
        # it the fp32 main shards would stay on the GPU and only the moments would move).
        optimizer_cpu_offload=offload,
        optimizer_offload_fraction=optim.cpu_offload_fraction,
        use_precision_aware_optimizer=offload,
        overlap_cpu_optimizer_d2h_h2d=offload,
    )
    has_magnitudes = any(".magnitude." in name for chunk in model_chunks for name, p in chunk.named_parameters()
                         if p.requires_grad)
    megatron_optimizer = get_megatron_optimizer(
        config, model_chunks, config_overrides=_param_group_overrides(config, optim, has_magnitudes=has_magnitudes))
    if optim.name == "exadam":
        for wrapper in inner_optimizers(megatron_optimizer):
            if offload:
                wrapper.optimizer = _hybrid_exadam(wrapper.optimizer, optim)
            else:
                wrapper.optimizer = _exadam_over(wrapper.optimizer.param_groups, optim)
        if offload:
            gc.collect()  # the replaced AdamW-based optimizers hold pinned host copies of every shard
    return megatron_optimizer


def _param_group_overrides(config, optim: OptimConfig, *, has_magnitudes: bool) -> dict | None:
    """megatron's standard per-group rules, with its weight-decay skip narrowed when the recipe
    decays DoRA magnitudes: megatron skips every 1-D parameter, HF's Trainer (the paper's stack)
    only biases and norms, so the magnitude vectors (1-D, trainable) are decayed there."""
    from megatron.core.optimizer import get_standard_config_overrides
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    overrides = get_standard_config_overrides(config)
    if not optim.decay_dora_magnitude or not has_magnitudes:
        return None  # megatron's own default path
    overrides = {key: value for key, value in overrides.items() if value.get("wd_mult") != 0.0}
    skip = ParamWithNamePredicate(
        name="1d_or_bias_except_dora_magnitude",
        fn=lambda param, name: (len(param.shape) == 1 or name.endswith(".bias")) and ".magnitude." not in name)
    overrides[ParamKey(with_name_predicate=skip)] = ParamGroupOverride(wd_mult=0.0)
    # An explicit override puts the (fp32) magnitudes in a group of their own: megatron's
    # distributed optimizer maps main params wrongly in a group that mixes fp32 with 16-bit params.
    magnitude = ParamWithNamePredicate(name="dora_magnitude", fn=lambda param, name: ".magnitude." in name)
    overrides[ParamKey(with_name_predicate=magnitude)] = ParamGroupOverride(wd_mult=1.0)
    return overrides


def check_cpu_offload(optim: OptimConfig, *, distributed: bool) -> None:
    """megatron's HybridDeviceOptimizer copies grads and params over CUDA streams into pinned
    host memory, and only the distributed optimizer hands it per-rank shards: refuse early."""
    if optim.cpu_offload_fraction == 0:
        return
    if not distributed:
        raise ValueError(f"optim.cpu_offload_fraction={optim.cpu_offload_fraction} needs "
                         "parallel.distributed_optimizer=true; allowed without it: 0")
    if not torch.cuda.is_available():
        raise ValueError(f"optim.cpu_offload_fraction={optim.cpu_offload_fraction} needs a CUDA GPU "
                         "(megatron's HybridDeviceOptimizer uses CUDA streams and pinned memory); allowed on CPU: 0")


def _exadam_over(param_groups: list[dict], optim: OptimConfig):
    """EXAdam over megatron's own param groups (the distributed optimizer's main-param shards
    are views, which torch's constructor refuses; from_param_groups takes them over)."""
    from gazal_nemo.optim.exadam import ExAdam

    return ExAdam.from_param_groups(param_groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                    weight_decay=optim.weight_decay,
                                    step_size_schedule=optim.exadam_step_size_schedule)


def _hybrid_exadam(hybrid, optim: OptimConfig):
    """megatron's HybridDeviceOptimizer rebuilt with EXAdam as its host and device update rule
    (it builds its sub-optimizers from classes; the groups keep megatron's lr / wd per group)."""
    import functools

    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    from gazal_nemo.optim.exadam import ExAdam

    exadam = functools.partial(ExAdam, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                               weight_decay=optim.weight_decay, step_size_schedule=optim.exadam_step_size_schedule)
    defaults = {k: v for k, v in hybrid.defaults.items() if k not in ("cpu_optimizer_cls", "gpu_optimizer_cls")}
    groups = [{k: v for k, v in g.items() if k not in ("cpu_optimizer_cls", "gpu_optimizer_cls")}
              for g in hybrid.param_groups]
    return HybridDeviceOptimizer(groups, cpu_optimizer_cls=exadam, gpu_optimizer_cls=exadam, **defaults)


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
