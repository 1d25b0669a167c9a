"""The engines' recipe settings (grpo.rollout.megatron, grpo.rollout.vllm): plain dataclasses, so
the recipe schema can hold them without importing any engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class MegatronSettings:
    """The megatron engine (and its uncached 'torch' reference)."""

    max_batch_size: int = 128
    """Sequences generated at once; the static KV cache is sized for them."""

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"grpo.rollout.megatron.max_batch_size={self.max_batch_size}; allowed: integers >= 1")


@dataclass(kw_only=True)
class VLLMSettings:
    """How a vLLM engine is built (recipe: grpo.rollout.vllm; `gazal eval --engine vllm` uses the defaults)."""

    gpu_memory_utilization: float = 0.35
    """Share of the GPU vLLM may take for its weights, activations and KV cache (colocated: next to the trainer)."""
    cpu_kv_cache_gib: int = 1
    """CPU only: whole GiB of host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE; vLLM's default takes most of the RAM)."""
    max_num_seqs: int = 256
    """Sequences vLLM schedules at once (one engine call holds a whole rollout batch)."""
    enforce_eager: bool = False
    """No CUDA graphs (faster start, slower decode); always eager on CPU."""
    weight_sync_bucket_mb: int = 512
    """Weights are pushed in buckets of this many MB (one TP gather round and one hand-over each)."""
    sleep_level: int = 2
    """CUDA: between rollouts vLLM frees its KV cache (1) and its weights too (2; the next push refills them); 0: stays awake."""
    gate_tolerance: float | None = None
    """Largest allowed |vLLM - trainer| log-prob on the push gate's probe; None: derived from the dtype (docs/GRPO.md)."""

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"grpo.rollout.vllm.gpu_memory_utilization={self.gpu_memory_utilization}; allowed: 0 < x <= 1")
        if isinstance(self.cpu_kv_cache_gib, bool) or not isinstance(self.cpu_kv_cache_gib, int) \
                or self.cpu_kv_cache_gib < 1:
            raise ValueError(f"grpo.rollout.vllm.cpu_kv_cache_gib={self.cpu_kv_cache_gib}; allowed: integers >= 1 "
                             "(VLLM_CPU_KVCACHE_SPACE takes whole GiB)")
        if self.max_num_seqs < 1 or self.weight_sync_bucket_mb < 1:
            raise ValueError("grpo.rollout.vllm.max_num_seqs and weight_sync_bucket_mb must be >= 1")
        if self.sleep_level not in (0, 1, 2):
            raise ValueError(f"grpo.rollout.vllm.sleep_level={self.sleep_level}; allowed: 0, 1, 2")
        if self.gate_tolerance is not None and not self.gate_tolerance > 0:
            raise ValueError(f"grpo.rollout.vllm.gate_tolerance={self.gate_tolerance}; allowed: null or > 0")
