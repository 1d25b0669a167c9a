"""The recipe schema: one YAML file per experiment, validated before any GPU work.

A recipe is a `Recipe` of sections; each section's dataclass lives next to the code that
uses it (adapter in peft/, SFT data in data/, the MCQ prompt data in tasks/, GRPO in rl/)
and the trainer-core sections in recipe_sections.py. This module is the one place a recipe
is judged, whatever the command and whether or not it is a dry run:

* `load_recipe(path, overrides)`: every key, type, range and rule that compares two keys
  (`Recipe.__post_init__`), each error naming the dotted key as the recipe writes it;
* `check_layout(recipe, world_size, shape)`: the rules that need the world size or the
  model (parallel layout, batch splits, grpo.prompts_per_step over data-parallel ranks);
* `check_runtime(recipe)`: what this machine must offer (vLLM, CUDA, reward plug-ins).

The stages call nothing else to validate, so `--dry-run` refuses exactly what a run refuses
before it loads data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gazal_nemo.config_io import apply_overrides, from_dict, load_yaml
from gazal_nemo.data.config import SFTDataConfig
from gazal_nemo.eval.in_training import TrainingEvalConfig
from gazal_nemo.inference.settings import MegatronSettings, VLLMSettings
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
from gazal_nemo.rl.config import DynamicSamplingConfig, GRPOLossConfig, RewardConfig, SamplingConfig
from gazal_nemo.rl.guard import GuardConfig
from gazal_nemo.tasks.mcq import MCQDataConfig


@dataclass(kw_only=True)
class RolloutConfig:
    """Which engine generates GRPO completions (gazal_nemo/inference/registry.py) and its settings."""

    engine: Literal["megatron", "torch", "vllm"] = "megatron"
    """megatron: KV-cache generation on the training weights themselves (the CPU default and the reference);
    torch: the same without a KV cache (tests); vllm: vLLM colocated in the training processes, weights pushed
    and gated after every step (the paper's engine; the 32B recipes' default)."""
    megatron: MegatronSettings = field(default_factory=MegatronSettings)
    """Settings of the megatron and torch engines."""
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    """Settings of the vLLM engine."""
    mode: Literal["colocated", "async"] = "colocated"
    """colocated: the engine generates inside the training ranks, between steps (the paper); async: the job's last
    generator_ranks ranks generate with vLLM while the others train (stages/grpo_async.py)."""
    generator_ranks: int = 0
    """async: how many of the job's ranks (the last ones) generate instead of training."""
    generator_tp: int = 1
    """async: vLLM tensor-parallel size on the generator ranks; generator_ranks / generator_tp replicas."""
    max_staleness: int = 1
    """async: a sample trained at step t+1 may come from weights up to this many steps older than step t's (0: synchronous)."""

    def __post_init__(self):
        if self.mode == "colocated":
            return
        if self.engine != "vllm":
            raise ValueError(f"grpo.rollout.mode=async with grpo.rollout.engine={self.engine!r}; allowed: vllm "
                             "(the generator ranks hold no trainer model)")
        if self.generator_ranks < 1 or self.generator_tp < 1 or self.generator_ranks % self.generator_tp:
            raise ValueError(f"grpo.rollout.generator_ranks={self.generator_ranks} with generator_tp="
                             f"{self.generator_tp}; allowed: generator_ranks >= 1, a multiple of generator_tp >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"grpo.rollout.max_staleness={self.max_staleness}; allowed: integers >= 0")


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
    log_rollouts_every: int = 10
    """Every N steps, write sampled completions with their rewards and advantages to logging.dir/rollouts.jsonl; 0: off."""
    log_rollouts_groups: int = 4
    """Groups (prompts x num_generations completions) of data-parallel rank 0 written per logged step."""

    def __post_init__(self):
        for key in ("prompts_per_step", "num_iterations", "steps_per_generation"):
            if getattr(self, key) < 1:
                raise ValueError(f"grpo.{key}={getattr(self, key)}; allowed: integers >= 1")
        for key in ("log_rollouts_every", "log_rollouts_groups"):
            if getattr(self, key) < 0:
                raise ValueError(f"grpo.{key}={getattr(self, key)}; allowed: integers >= 0 (0: off)")
        sampling, loss = self.sampling, self.loss
        correction = [f"grpo.loss.{key}={getattr(loss, key)}" for key in ("tis_cap", "mis_threshold")
                      if getattr(loss, key) is not None]
        if correction and sampling.train_logprobs == "temperature" and (sampling.top_k or sampling.top_p < 1):
            # Every engine's sampler log-probs are under the filtered distribution it drew from;
            # the trainer's would be temperature-only, so the ratios would not be 1 even for
            # identical weights (TRL issue 4159, vLLM issue 42259).
            raise ValueError(f"{' '.join(correction)} with grpo.sampling.train_logprobs='temperature' and "
                             f"top_k={sampling.top_k}/top_p={sampling.top_p}: the importance ratios would compare "
                             "two distributions; set grpo.sampling.train_logprobs=filtered, or top_k=0 and top_p=1, "
                             "or drop the correction")


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
        """Every rule that compares two keys; one place, so every command and the dry run apply it."""
        if not self.name:
            raise ValueError("name=''; allowed: a recipe name")
        if self.stage == "sft" and self.sft_data is None:
            raise ValueError("stage 'sft' needs an sft_data section")
        if self.stage == "grpo" and self.grpo is None:
            raise ValueError("stage 'grpo' needs a grpo section")
        if self.stage == "sft" and self.sft_data.max_length != self.train.seq_length:
            raise ValueError(f"sft_data.max_length={self.sft_data.max_length} must equal "
                             f"train.seq_length={self.train.seq_length} (samples are packed to that length)")
        if self.stage == "grpo":
            self._check_grpo()
        if self.train.global_batch_size % self.train.micro_batch_size:
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={self.train.micro_batch_size}")
        if self.train.max_steps is not None and self.train.stop_at_step is not None \
                and self.train.stop_at_step > self.train.max_steps:
            raise ValueError(f"train.stop_at_step={self.train.stop_at_step} is after the run's end "
                             f"(train.max_steps={self.train.max_steps}); allowed: null or 1..{self.train.max_steps}")
        if self.optim.cpu_offload_fraction > 0 and not self.parallel.distributed_optimizer:
            raise ValueError(f"optim.cpu_offload_fraction={self.optim.cpu_offload_fraction} needs "
                             "parallel.distributed_optimizer=true; allowed without it: 0")
        if self.eval_during_training.every and self.parallel.pp > 1:
            raise ValueError(f"eval_during_training.every={self.eval_during_training.every} needs parallel.pp=1 "
                             "(it generates with the megatron engine); set eval_during_training.every=0 or "
                             "evaluate the exports with `gazal eval`")
        if self.eval_during_training.every:
            from gazal_nemo.eval.loaders import BENCHMARKS

            if self.eval_during_training.benchmark not in BENCHMARKS:
                raise ValueError(f"eval_during_training.benchmark={self.eval_during_training.benchmark!r}; "
                                 f"allowed: {', '.join(map(repr, BENCHMARKS))}")

    def _check_grpo(self) -> None:
        grpo = self.grpo
        if grpo.guard.enabled and self.checkpoint.save_every == 0:
            raise ValueError("grpo.guard.enabled=true rolls back to periodic checkpoints: set checkpoint.save_every > 0, "
                             "or grpo.guard.enabled=false")
        per_step = grpo.prompts_per_step * grpo.sampling.num_generations
        if self.train.global_batch_size != per_step:
            # The GRPO step trains prompts_per_step groups of num_generations: a different
            # global batch would be a number nothing reads.
            raise ValueError(f"train.global_batch_size={self.train.global_batch_size} must equal "
                             f"grpo.prompts_per_step x grpo.sampling.num_generations = "
                             f"{grpo.prompts_per_step} x {grpo.sampling.num_generations} = {per_step}")
        if grpo.train_adapter and self.adapter is None:
            raise ValueError("grpo.train_adapter=true but the recipe has no adapter section; add one, "
                             "or set grpo.train_adapter=false")
        if self.parallel.pp > 1:
            # The megatron/torch engines generate on the whole model of one rank, and vLLM is
            # colocated per TP group: every rollout engine needs the layers on one rank.
            raise ValueError(f"parallel.pp={self.parallel.pp} with stage grpo (grpo.rollout.engine="
                             f"{grpo.rollout.engine!r}); allowed: 1 (the rollout engines generate on whole models)")
        rollout = grpo.rollout
        if rollout.mode == "async" and (grpo.num_iterations, grpo.steps_per_generation) != (1, 1):
            raise ValueError("grpo.rollout.mode=async with grpo.num_iterations / steps_per_generation > 1; allowed: 1 "
                             "(asynchronous rollouts already train on samples of older weights)")
        if rollout.mode == "async" and rollout.max_staleness and grpo.loss.tis_cap is None and \
                grpo.loss.mis_threshold is None:
            # AReaL without its decoupled objective: AIME24 42.0 -> 23.3 at staleness 4.
            raise ValueError(f"grpo.rollout.max_staleness={rollout.max_staleness} trains on samples of older weights "
                             "without a correction: set grpo.loss.tis_cap (e.g. 2) and/or grpo.loss.mis_threshold "
                             "(e.g. 2), or grpo.rollout.max_staleness=0")
        if grpo.rollout.engine == "vllm" and self.parallel.cp > 1:
            raise ValueError(f"parallel.cp={self.parallel.cp} with grpo.rollout.engine='vllm': the colocated engine is "
                             "one vLLM replica per TP group; allowed: 1")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(load_yaml(path), list(overrides or []))
    return from_dict(Recipe, data)


def check_layout(recipe: Recipe, world_size: int, shape) -> int:
    """Data-parallel size of the trainer; ValueError naming the key when the layout cannot work.
    With asynchronous rollouts the job's last grpo.rollout.generator_ranks ranks do not train."""
    par = recipe.parallel
    if recipe.stage == "grpo" and recipe.grpo.rollout.mode == "async":
        generators = recipe.grpo.rollout.generator_ranks
        if generators >= world_size:
            raise ValueError(f"grpo.rollout.generator_ranks={generators} leaves no trainer in a job of {world_size} "
                             f"ranks; allowed: 1 .. {world_size - 1}")
        world_size -= generators
    dp = check_world_layout(world_size, tp=par.tp, pp=par.pp, cp=par.cp)
    try:
        shape.check_parallel(tp=par.tp, pp=par.pp)
    except ValueError as e:
        raise ValueError(f"parallel.tp={par.tp} parallel.pp={par.pp}: {e}") from None
    per_step = recipe.train.global_batch_size
    if per_step % (recipe.train.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={per_step} must be a multiple of "
                         f"train.micro_batch_size*data_parallel = {recipe.train.micro_batch_size}*{dp}")
    if recipe.stage == "grpo" and recipe.grpo.rollout.mode == "async":
        _check_generator_split(recipe.grpo, dp)
    if recipe.grpo is not None and recipe.stage == "grpo" and recipe.grpo.prompts_per_step % dp:
        raise ValueError(f"grpo.prompts_per_step={recipe.grpo.prompts_per_step} must divide by the data-parallel "
                         f"size {dp} (world {world_size} / tp*pp*cp {par.tp * par.pp * par.cp})")
    if recipe.parallel.cp > 1:
        from gazal_nemo.models.qwen3 import transformer_engine_available

        if not transformer_engine_available():
            raise ValueError(f"parallel.cp={par.cp} needs Transformer Engine on GPU; allowed without it: 1")
    return dp


def _check_generator_split(grpo, dp: int) -> None:
    """Asynchronous rollouts: the generator replicas share out the trainer's data-parallel shares,
    whole (replicas divide dp) or in equal pieces (dp divides replicas, each share's prompts too)."""
    rollout = grpo.rollout
    replicas = rollout.generator_ranks // rollout.generator_tp
    per_rank = grpo.prompts_per_step // dp
    if replicas % dp and dp % replicas:
        raise ValueError(f"grpo.rollout.generator_ranks={rollout.generator_ranks} / generator_tp={rollout.generator_tp} "
                         f"= {replicas} vLLM replicas for a trainer of data-parallel size {dp}: one must divide the "
                         "other, so every replica gets the same work")
    if replicas > dp and per_rank % (replicas // dp):
        raise ValueError(f"grpo.prompts_per_step={grpo.prompts_per_step}: {per_rank} prompts per trainer rank do not "
                         f"split into {replicas // dp} equal pieces, one per generator replica")


def check_runtime(recipe: Recipe) -> None:
    """What the recipe needs from this machine, checked before any work (the dry run too):
    vLLM for grpo.rollout.engine=vllm, CUDA for optim.cpu_offload_fraction, and
    reward plug-ins that import and take the reward keywords."""
    import importlib.util

    import torch

    if recipe.stage == "grpo" and recipe.grpo.rollout.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("grpo.rollout.engine='vllm' needs vLLM: pip install 'gazal-nemo[vllm]' "
                             "(scripts/setup_env.sh installs the CPU build), or use engine 'megatron'")
    if recipe.optim.cpu_offload_fraction > 0 and not torch.cuda.is_available():
        raise ValueError(f"optim.cpu_offload_fraction={recipe.optim.cpu_offload_fraction} needs a CUDA GPU "
                         "(megatron's HybridDeviceOptimizer uses CUDA streams and pinned memory); allowed on CPU: 0")
    if recipe.stage == "grpo" and recipe.grpo.rewards.plugins:
        from gazal_nemo.rl.rewards import build_rewards

        build_rewards(recipe.grpo.rewards)
