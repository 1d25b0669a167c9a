"""Which engine generates: chosen by its name in the recipe or on the command line, built by
its entry here, never by a branch in a stage.

Two uses:
  * policy engines generate with a trainer's live weights (GRPO rollouts, in-training
    evaluation): `build_policy_engine(name, context, settings)`; "megatron" and "torch" run
    on the training model itself, "vllm" is colocated in the training processes;
  * standalone engines load a saved model (`gazal eval`, data synthesis):
    `build_standalone_engine(name, source, options)`; "megatron", "hf" and "vllm".
A new engine is one entry in each table it serves (plus its settings dataclass).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gazal_nemo.inference.settings import VLLMSettings
from gazal_nemo.inference.source import ModelSource, adapter_config_from_peft, device_dtype, is_rank0

POLICY_ENGINE_NAMES = ("megatron", "torch", "vllm")
STANDALONE_ENGINE_NAMES = ("megatron", "hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class PolicyContext:
    """What a policy engine needs to know about the trainer of this rank."""

    model: object
    """The unwrapped megatron model of this rank (pp = 1)."""
    shape: object
    """Qwen3Shape of the model."""
    hf_dir: str
    """HF folder or hub id of the model's config and tokenizer."""
    tp: int
    dp: int
    dtype: str
    """Recipe precision.dtype: bf16, fp16 or fp32."""
    seed: int
    max_model_len: int
    """Longest prompt + completion the engine must hold."""
    stop_ids: list[int]
    pad_id: int
    probe: list[int] = field(default_factory=list)
    """Prompt + completion tokens the weight-push gate scores after every push."""


def _megatron_policy(ctx: PolicyContext, rollout, *, use_kv_cache: bool = True):
    from gazal_nemo.inference.megatron_engine import MegatronEngine

    return MegatronEngine(ctx.model, stop_token_ids=ctx.stop_ids, pad_token_id=ctx.pad_id,
                          max_batch_size=rollout.megatron.max_batch_size, use_kv_cache=use_kv_cache,
                          max_model_len=ctx.max_model_len)


def _vllm_policy(ctx: PolicyContext, rollout):
    from gazal_nemo.inference.push_gate import PushGate
    from gazal_nemo.inference.vllm_engine import ColocatedVLLMEngine
    from gazal_nemo.training.model_setup import DTYPES

    settings = rollout.vllm
    gate = PushGate(ctx.model, ctx.probe, dtype=DTYPES[ctx.dtype], tolerance=settings.gate_tolerance)
    return ColocatedVLLMEngine.build(model=ctx.model, shape=ctx.shape, hf_dir=ctx.hf_dir, settings=settings,
                                     tp=ctx.tp, dp=ctx.dp, dtype=ctx.dtype, seed=ctx.seed,
                                     max_model_len=ctx.max_model_len, stop_token_ids=ctx.stop_ids, gate=gate)


POLICY_ENGINES: dict[str, Callable] = {
    "megatron": _megatron_policy,
    "torch": lambda ctx, rollout: _megatron_policy(ctx, rollout, use_kv_cache=False),
    "vllm": _vllm_policy,
}


def build_policy_engine(name: str, context: PolicyContext, rollout):
    """The policy engine `name` for this rank (every rank calls it together)."""
    return POLICY_ENGINES[name](context, rollout)


# --- standalone ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StandaloneOptions:
    """How a standalone engine is launched (gazal eval's flags)."""

    tp: int = 1
    work_dir: Path
    """Where conversions of the model (megatron -> HF, step exports) are cached."""
    stop_ids: list[int]
    pad_id: int
    max_batch_size: int = 16
    max_model_len: int | None = None
    """None: the model's max_position_embeddings."""
    seed: int = 0
    vllm: VLLMSettings = field(default_factory=VLLMSettings)


def _megatron_standalone(source: ModelSource, options: StandaloneOptions):
    """This rank's megatron Qwen3 at TP=tp (world size must be tp), adapter merged."""
    from gazal_nemo.convert.load_hf import load_hf_weights
    from gazal_nemo.inference.megatron_engine import MegatronEngine
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel, launch_env

    check_standalone_layout(source, engine="megatron", tp=options.tp, world_size=launch_env().world_size)
    init_parallel(tp=options.tp)
    shape = Qwen3Shape.from_pretrained(source.hf_dir)
    _, dtype = device_dtype()
    model = build_qwen3(shape, transformer_config(shape, tp=options.tp, params_dtype=dtype))
    if source.megatron_ckpt is not None:
        from gazal_nemo.convert.dist_ckpt import load_model

        load_model(model, source.megatron_ckpt)
    else:
        load_hf_weights(model, source.hf_dir, shape)
    if source.adapter_dir is not None:
        from gazal_nemo.peft.dora import apply_adapter, merge_adapter
        from gazal_nemo.peft.export import load_peft_adapter

        apply_adapter(model, adapter_config_from_peft(source.adapter_dir), shape)
        load_peft_adapter(model, shape, source.adapter_dir)
        merge_adapter(model)  # one GEMM per linear at inference
    model.eval()
    return MegatronEngine(model, stop_token_ids=options.stop_ids, pad_token_id=options.pad_id,
                          max_batch_size=options.max_batch_size, max_model_len=options.max_model_len)


def _hf_standalone(source: ModelSource, options: StandaloneOptions):
    from gazal_nemo.inference.hf_engine import build_hf_engine

    return build_hf_engine(source, work_dir=options.work_dir, stop_ids=options.stop_ids, pad_id=options.pad_id,
                           max_batch_size=options.max_batch_size)


def _vllm_standalone(source: ModelSource, options: StandaloneOptions):
    """vLLM on HF weights: a megatron checkpoint is converted once; a LoRA adapter is served by vLLM's LoRA."""
    from gazal_nemo.inference.hf_engine import hf_folder
    from gazal_nemo.inference.vllm_engine import VLLMEngine
    from gazal_nemo.models.qwen3 import Qwen3Shape

    if source.adapter_dir is not None and adapter_config_from_peft(source.adapter_dir).use_dora:
        raise ValueError(f"{source.adapter_dir}: a DoRA adapter; vLLM cannot serve DoRA magnitudes: evaluate the "
                         "stage's merged export (export/merged) or use --engine megatron")
    hf_dir = hf_folder(source, options.work_dir)
    shape = Qwen3Shape.from_pretrained(hf_dir)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    return VLLMEngine.from_hf(hf_dir, settings=options.vllm, tp=options.tp, dtype=dtype, seed=options.seed,
                              max_model_len=options.max_model_len or shape.max_position_embeddings,
                              stop_token_ids=options.stop_ids, adapter_dir=source.adapter_dir)


STANDALONE_ENGINES: dict[str, Callable] = {
    "megatron": _megatron_standalone,
    "hf": _hf_standalone,
    "vllm": _vllm_standalone,
}


def check_standalone_layout(source: ModelSource, *, engine: str, tp: int, world_size: int) -> str:
    """Refuse a TP size the model or the launch cannot take; one line describing the plan."""
    from gazal_nemo.models.qwen3 import Qwen3Shape

    if engine not in STANDALONE_ENGINES:
        raise ValueError(f"--engine {engine!r}; allowed: {', '.join(STANDALONE_ENGINES)}")
    if engine == "hf" and tp != 1:
        raise ValueError("--engine hf runs on one device; use --engine megatron or vllm for --tp > 1")
    if engine == "megatron" and world_size != tp:
        raise ValueError(f"--tp {tp} but {world_size} processes; evaluation runs one model replica: "
                         f"launch --tp processes (torchrun --nproc-per-node {tp})")
    if engine == "vllm" and world_size != 1:
        raise ValueError(f"--engine vllm starts its own {tp} workers: launch one process, not {world_size}")
    if engine == "vllm":
        from gazal_nemo.inference.vllm_engine import require_vllm

        require_vllm()
    if source.kind != "step":  # a step checkpoint's architecture is known after its export
        shape = Qwen3Shape.from_pretrained(source.hf_dir)
        shape.check_parallel(tp=tp, pp=1)
    return f"{source.kind} model {source.hf_dir}, engine {engine}, tp {tp}"


def build_standalone_engine(name: str, source: ModelSource, options: StandaloneOptions):
    """The engine `name` on `source`; prints how long loading took (rank 0)."""
    start = time.time()
    engine = STANDALONE_ENGINES[name](source, options)
    if is_rank0():
        print(f"engine: {name} ready in {time.time() - start:.1f}s", flush=True)
    return engine
