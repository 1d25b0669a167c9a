"""Recipe sections owned by the trainer core: model, parallelism, precision, optimiser,
schedule, checkpoints, logging. Defaults are the paper's SFT values (Appendix A.1)
where the paper gives one; GRPO recipes override them.

Every number has a range checked here (config_io already refuses .inf and .nan), and a
length of zero or less is refused unless its docstring gives it a meaning (save_every=0:
only at the end; keep_last=0: keep all): a run that trains nothing must not end with exit 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


def _at_least(key: str, value, minimum, *, allow_none: bool = False) -> None:
    """ValueError naming `key` unless value >= minimum (or None, when allowed)."""
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        none = "null or " if allow_none else ""
        kind = "integers" if isinstance(minimum, int) else "numbers"
        raise ValueError(f"{key}={value!r}; allowed: {none}{kind} >= {minimum}")


def _within(key: str, value: float, low: float, high: float, *, high_open: bool = False) -> None:
    if not (low <= value < high if high_open else low <= value <= high):
        raise ValueError(f"{key}={value!r}; allowed: {low} <= x {'<' if high_open else '<='} {high}")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train and where its weights come from."""

    hf_path: str
    """Hugging Face Qwen3 folder or hub id: architecture, tokenizer and (unless megatron_ckpt) weights."""
    megatron_ckpt: str | None = None
    """Megatron dist checkpoint to start from (made by `gazal convert hf-to-megatron`); faster at scale."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split over GPUs; tp*pp*cp must divide the world size."""

    tp: int = 1
    """Tensor-parallel size (heads, kv groups, ffn and vocab must divide by it)."""
    pp: int = 1
    """Pipeline-parallel size (layers must divide by it)."""
    cp: int = 1
    """Context-parallel size (needs Transformer Engine)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TE norms; ignored at tp=1)."""
    distributed_optimizer: bool = True
    """Shard optimizer states over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool | None = None
    """Overlap DDP's gradient reduce(-scatter) with the backward pass in ~40M-parameter buckets; None: on when dp > 1."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's param all-gather with the next forward (dp > 1); code that reads params right after a step calls model_setup.finish_param_gather first."""

    def __post_init__(self):
        for key in ("tp", "pp", "cp"):
            if getattr(self, key) < 1:
                raise ValueError(f"parallel.{key}={getattr(self, key)}; allowed: integers >= 1")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true; "
                             "allowed without it: false")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numeric formats."""

    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Parameter/compute dtype (paper: bfloat16)."""
    fp8: Literal["e4m3", "hybrid"] | None = None
    """Transformer Engine FP8 format for linear layers (H100); None disables FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and reduce gradients in fp32 buffers (4 B/param); false: in the param dtype (2 B/param, bf16 sums)."""


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: Literal["exadam", "adamw"] = "exadam"
    """EXAdam as in the paper; AdamW for comparison."""
    lr: float = 2e-5
    """Peak learning rate (paper SFT 2e-5, GRPO 1e-6)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Cosine (SFT) or constant (GRPO), both after linear warmup."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent in linear warmup (paper SFT 0.05, GRPO 0.0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (paper: 0.1)."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    exadam_step_size_schedule: bool = False
    """EXAdam's ln(sqrt(2)*sqrt(t+1)) step scaling from the paper's first version (off in the authors' later code)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    decay_dora_magnitude: bool = True
    """Weight decay on DoRA's magnitude vectors, as the paper's HF Trainer applies it (it skips only biases
    and norms); false: megatron's rule, no decay on any 1-D parameter."""
    cpu_offload_fraction: float = 0.0
    """Share of optimizer states and fp32 main params kept and updated on the host (megatron's
    HybridDeviceOptimizer; needs CUDA and the distributed optimizer); 0 keeps all on the GPU."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}; allowed: > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr}; allowed: 0 <= x <= optim.lr ({self.lr})")
        _within("optim.cpu_offload_fraction", self.cpu_offload_fraction, 0, 1)
        _within("optim.warmup_ratio", self.warmup_ratio, 0, 1, high_open=True)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _within("optim.beta1", self.beta1, 0, 1, high_open=True)
        _within("optim.beta2", self.beta2, 0, 1, high_open=True)
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps}; allowed: > 0")
        _at_least("optim.grad_clip", self.grad_clip, 0.0)


@dataclass(kw_only=True)
class TrainConfig:
    """Batching and run length."""

    seed: int = 3407
    """Seed for init, data order and dropout (paper SFT 3407)."""
    micro_batch_size: int = 1
    """Sequences per GPU per forward (packed to seq_length)."""
    global_batch_size: int = 128
    """Sequences per optimizer step over all data-parallel ranks (paper: 128)."""
    seq_length: int = 8192
    """Tokens per (packed) sequence (paper: 8192)."""
    epochs: int = 1
    """Passes over the data (paper: 1)."""
    max_steps: int | None = None
    """Length of the run in optimizer steps (None: run the epochs); the LR schedule spans it."""
    stop_at_step: int | None = None
    """End this job after that step, with a checkpoint, though the run is longer (Slurm time limits: resubmit to go on)."""
    recompute: Literal["none", "selective", "full"] = "full"
    """Activation recompute (paper: gradient checkpointing on)."""

    def __post_init__(self):
        _at_least("train.seed", self.seed, 0)
        _at_least("train.micro_batch_size", self.micro_batch_size, 1)
        _at_least("train.global_batch_size", self.global_batch_size, 1)
        _at_least("train.seq_length", self.seq_length, 2)
        _at_least("train.epochs", self.epochs, 1)
        _at_least("train.max_steps", self.max_steps, 1, allow_none=True)
        _at_least("train.stop_at_step", self.stop_at_step, 1, allow_none=True)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and how often checkpoints are written."""

    dir: str = "runs/checkpoints"
    """Folder of step checkpoints (step_000100/ ...)."""
    save_every: int = 100
    """Save every N optimizer steps (and always at the end); 0 saves only at the end."""
    keep_last: int = 3
    """Keep the newest K step checkpoints; 0 keeps all."""
    resume: bool = True
    """Continue from the newest complete checkpoint in dir if there is one."""
    allow_changes: tuple[str, ...] = ()
    """Dotted recipe keys or prefixes that may differ from the checkpoint's recipe on resume, e.g. [optim.lr], and input files or folders whose contents may differ from the checkpoint's fingerprints, e.g. [/data/sft.jsonl] (docs/CHECKPOINTS.md)."""

    def __post_init__(self):
        _at_least("checkpoint.save_every", self.save_every, 0)
        _at_least("checkpoint.keep_last", self.keep_last, 0)
        if not self.dir:
            raise ValueError("checkpoint.dir=''; allowed: a folder")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    dir: str = "runs/logs"
    """metrics.jsonl and TensorBoard events are written here."""
    tensorboard: bool = True
    """Write TensorBoard events when the tensorboard package is installed."""
    log_every: int = 1
    """Log every N optimizer steps."""

    def __post_init__(self):
        _at_least("logging.log_every", self.log_every, 1)
        if not self.dir:
            raise ValueError("logging.dir=''; allowed: a folder")
