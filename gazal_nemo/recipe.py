"""The recipe schema: one YAML file per experiment, validated before any GPU work.

A recipe is a `Recipe` of sections; each section's dataclass lives next to the code that
uses it (adapter in peft/, data in data/, GRPO in rl/) and the trainer-core sections in
recipe_sections.py. `load_recipe(path, overrides)` returns a validated Recipe;
`check_layout(recipe, world_size, shape)` refuses impossible parallel layouts naming the
key and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gazal_nemo.config_io import apply_overrides, from_dict, load_yaml
from gazal_nemo.data.config import SFTDataConfig
from gazal_nemo.eval.in_training import TrainingEvalConfig
from gazal_nemo.parallel import check_layout as check_world_layout
from gazal_nemo.peft.config import AdapterConfig
from gazal_nemo.recipe_sections import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainConfig,
)
from gazal_nemo.rl.config import (
    DynamicSamplingConfig,
    GRPOLossConfig,
    MCQDataConfig,
    RewardConfig,
    SamplingConfig,
)
from gazal_nemo.rl.guard import GuardConfig


@dataclass(kw_only=True)
class RolloutConfig:
    """Which engine generates GRPO completions."""

    engine: Literal["torch", "megatron", "vllm"] = "megatron"
    """torch: plain sampler (CPU tests); megatron: megatron-core inference on the training weights; vllm: colocated vLLM."""
    max_batch_size: int = 128
    """Sequences generated at once."""
    vllm_gpu_memory_utilization: float = 0.35
    """Fraction of GPU memory vLLM may take next to the trainer (colocated)."""
    weight_sync_bucket_mb: int = 512
    """Weights are pushed to vLLM in buckets of this many MB (not tensor by tensor)."""


@dataclass(kw_only=True)
class GRPOConfig:
    """Stage-2 settings (paper section 4, Table 4)."""

    data: MCQDataConfig
    """UltraMedical-style MCQ prompts."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: GRPOLossConfig = field(default_factory=GRPOLossConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    prompts_per_step: int = 32
    """Prompts per optimizer step (paper: 32, x4 generations = 128 completions)."""
    train_adapter: bool = False
    """Train a LoRA/DoRA adapter (recipe.adapter) instead of all parameters."""
    num_iterations: int = 1
    """Optimizer updates per rollout batch (TRL num_iterations, GRPO's mu; paper 1). Above 1 the old
    log-probs are computed once before the first update and the clip bounds start to act."""
    steps_per_generation: int = 1
    """Optimizer steps one rollout batch is split over (TRL steps_per_generation; paper 1): each step still
    trains prompts_per_step prompts, the engine generates for steps_per_generation times as many at once."""
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    """DAPO dynamic sampling (off, as in the paper)."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Collapse guard with automatic rollback (gazal_nemo/rl/guard.py); guard.enabled=false: none."""

    def __post_init__(self):
        for key in ("num_iterations", "steps_per_generation"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.{key}={getattr(self, key)}; allowed: integers >= 1")


@dataclass(kw_only=True)
class Recipe:
    """One experiment."""

    name: str
    """Recipe name (what it is: sft_qwen3_32b_dora_2xh100, tiny_cpu_sft, ...)."""
    stage: Literal["sft", "grpo"]
    """Which stage this recipe runs."""
    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    adapter: AdapterConfig | None = None
    """DoRA/LoRA adapter; None trains all parameters."""
    sft_data: SFTDataConfig | None = None
    """SFT data (stage sft)."""
    grpo: GRPOConfig | None = None
    """GRPO settings (stage grpo)."""
    eval_during_training: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)
    """Held-out evaluation every N steps by the training model itself (eval/in_training.py); off by default."""
    export_dir: str | None = None
    """Where to write the HF export (PEFT adapter and merged model) at the end; None skips export."""

    def __post_init__(self):
        if self.stage == "sft" and self.sft_data is None:
            raise ValueError("stage 'sft' needs an sft_data section")
        if self.stage == "grpo" and self.grpo is None:
            raise ValueError("stage 'grpo' needs a grpo section")
        if self.stage == "grpo" and self.grpo.guard.enabled and self.checkpoint.save_every == 0:
            raise ValueError("grpo.guard.enabled=true rolls back to periodic checkpoints: set checkpoint.save_every > 0, "
                             "or grpo.guard.enabled=false")
        if self.stage == "grpo":
            per_step = self.grpo.prompts_per_step * self.grpo.sampling.num_generations
            if self.train.global_batch_size != per_step:
                # The GRPO step trains prompts_per_step groups of num_generations: a different
                # global batch would be a number nothing reads.
                raise ValueError(f"train.global_batch_size={self.train.global_batch_size} must equal "
                                 f"grpo.prompts_per_step x grpo.sampling.num_generations = "
                                 f"{self.grpo.prompts_per_step} x {self.grpo.sampling.num_generations} = {per_step}")
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.train.micro_batch_size}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(load_yaml(path), list(overrides or []))
    return from_dict(Recipe, data)


def check_layout(recipe: Recipe, world_size: int, shape) -> int:
    """Data-parallel size; ValueError naming the key when the layout cannot work."""
    par = recipe.parallel
    dp = check_world_layout(world_size, tp=par.tp, pp=par.pp, cp=par.cp)
    try:
        shape.check_parallel(tp=par.tp, pp=par.pp)
    except ValueError as e:
        raise ValueError(f"parallel.tp={par.tp} parallel.pp={par.pp}: {e}") from None
    per_step = recipe.train.global_batch_size
    if per_step % (recipe.train.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={per_step} must be a multiple of "
                         f"train.micro_batch_size*data_parallel = {recipe.train.micro_batch_size}*{dp}")
    if recipe.parallel.cp > 1:
        from gazal_nemo.models.qwen3 import transformer_engine_available

        if not transformer_engine_available():
            raise ValueError(f"parallel.cp={par.cp} needs Transformer Engine on GPU; allowed without it: 1")
    return dp
