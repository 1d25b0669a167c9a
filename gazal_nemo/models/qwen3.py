"""Qwen3 as a megatron-core GPTModel.

A Hugging Face `config.json` (Qwen3ForCausalLM) maps onto megatron's TransformerConfig:
GQA (`num_query_groups`), RMSNorm on q and k per head (`qk_layernorm`), SwiGLU
(`gated_linear_unit` + silu), RoPE with Qwen's theta, optional YaRN, optional tied
embeddings, no biases. Two layer specs: Transformer Engine's (FP8-capable) when TE
imports and a GPU is present, else a torch-native spec whose core attention is SDPA.
The model knows nothing of training; adapters and precision are applied from outside.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
QWEN3_DEFAULT_HEAD_DIM = 128
"""What transformers' Qwen3Config uses when config.json has no head_dim."""


@dataclass(frozen=True, kw_only=True)
class Qwen3Shape:
    """The architecture facts of a Qwen3 checkpoint that the Megatron model needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    yarn_factor: float | None = None
    yarn_original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict, *, source: str = "config.json") -> Qwen3Shape:
        """Read a Qwen3 config.json dict; refuses other architectures with the offending key."""
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        if model_type != "qwen3" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
            raise ValueError(
                f"{source}: model_type={model_type!r} architectures={archs!r} is not Qwen3; "
                f"supported: model_type='qwen3' with {list(SUPPORTED_ARCHITECTURES)}"
            )
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        for key in required + ["head_dim"] * (cfg.get("head_dim") is not None):
            if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
                raise ValueError(f"{source}: {key}={cfg[key]!r}; allowed: integers >= 1")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else {})
        rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
        if rope_type not in (None, "default", "yarn"):
            raise ValueError(f"{source}: rope scaling type {rope_type!r} unsupported; supported: yarn or none")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            # transformers' Qwen3Config reads a missing head_dim as 128, not hidden_size / heads: a
            # checkpoint made with another head size would then load with mismatched shapes.
            derived = cfg["hidden_size"] // heads if heads else 0
            if derived != QWEN3_DEFAULT_HEAD_DIM:
                raise ValueError(
                    f"{source}: no head_dim; transformers reads that as {QWEN3_DEFAULT_HEAD_DIM}, but hidden_size / "
                    f"num_attention_heads = {cfg['hidden_size']} / {heads} = {derived}: add the checkpoint's "
                    f'"head_dim" to config.json (q_proj rows / num_attention_heads)')
            head_dim = QWEN3_DEFAULT_HEAD_DIM
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg["num_key_value_heads"],
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0))),
            max_position_embeddings=cfg.get("max_position_embeddings", 40960),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            yarn_factor=float(scaling["factor"]) if rope_type == "yarn" else None,
            yarn_original_max_position_embeddings=(
                scaling.get("original_max_position_embeddings") if rope_type == "yarn" else None
            ),
        )

    @classmethod
    def from_pretrained(cls, hf_dir: str | Path) -> Qwen3Shape:
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face Qwen3 folder)")
        return cls.from_hf_dict(json.loads(path.read_text()), source=str(path))

    def check_parallel(self, *, tp: int, pp: int) -> None:
        """Refuse a TP/PP split this model cannot take, naming the dimension that fails."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} not divisible by tp={tp}")
        if self.num_key_value_heads % tp:
            problems.append(f"num_key_value_heads={self.num_key_value_heads} not divisible by tp={tp}")
        if self.intermediate_size % tp:
            problems.append(f"intermediate_size={self.intermediate_size} not divisible by tp={tp}")
        if self.vocab_size % tp:
            problems.append(f"vocab_size={self.vocab_size} not divisible by tp={tp}")
        if self.num_layers % pp:
            problems.append(f"num_hidden_layers={self.num_layers} not divisible by pp={pp}")
        if problems:
            raise ValueError("impossible parallel layout: " + "; ".join(problems))


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (its spec needs both)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def layer_spec(shape: Qwen3Shape, *, use_te: bool):
    """Transformer Engine spec, or the torch-native spec with SDPA core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    from gazal_nemo.models.sdpa_attention import SDPAttention

    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def transformer_config(shape: Qwen3Shape, *, tp: int = 1, pp: int = 1, params_dtype=torch.float32,
                       recompute: str | None = None, fp8: str | None = None, fp8_recipe: str = "delayed",
                       sequence_parallel: bool = False, **overrides):
    """The megatron TransformerConfig that computes what HF's Qwen3 computes."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.attention_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
    )
    if recompute == "full":
        fields.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        fields.update(recompute_granularity="selective")
    elif recompute not in (None, "none"):
        raise ValueError(f"recompute={recompute!r}; allowed: none, selective, full")
    if fp8:
        fields.update(fp8=fp8, fp8_recipe=fp8_recipe)
    fields.update(overrides)
    config = TransformerConfig(**fields)
    if shape.yarn_factor is not None:
        # GPTModel reads the YaRN fields by getattr; TransformerConfig has no slots for them.
        config.yarn_rotary_scaling_factor = shape.yarn_factor
        config.yarn_original_max_position_embeddings = shape.yarn_original_max_position_embeddings
        config.yarn_beta_fast = 32.0
        config.yarn_beta_slow = 1.0
        config.yarn_mscale = 1.0
        config.yarn_mscale_all_dim = 0.0
        config.yarn_correction_range_round_to_int = True
    return config


class PositionAwareRotary(torch.nn.Module):
    """RoPE that honours per-token position ids (packed documents restart at 0).

    megatron's GPTModel computes RoPE for positions 0..S-1 whatever `position_ids` says;
    TE's THD path fixes that with cu_seqlens, the torch spec needs the gather done here.
    The [S, B, 1, D] result broadcasts in megatron's rotary application like [S, 1, 1, D].
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.position_ids = None

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)

    def forward(self, max_seq_len, *args, **kwargs):
        out = self.inner(max_seq_len, *args, **kwargs)
        if self.position_ids is None:
            return out
        emb, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        emb_SB1D = emb[:, 0, 0, :][self.position_ids.t()].unsqueeze(2)
        return (emb_SB1D, *rest) if rest is not None else emb_SB1D

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class Qwen3GPTModel(GPTModel):
        """GPTModel whose RoPE follows `position_ids` when they are not simply 0..S-1."""

        def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
            rotary = getattr(self, "rotary_pos_emb", None)
            packed = (
                isinstance(rotary, PositionAwareRotary) and position_ids is not None
                and kwargs.get("inference_context") is None and kwargs.get("packed_seq_params") is None
                and not torch.equal(position_ids, _arange_like(position_ids))
            )
            if packed:
                rotary.position_ids = position_ids
            try:
                return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
            finally:
                if packed:
                    rotary.position_ids = None

    return Qwen3GPTModel


def _arange_like(position_ids):
    return torch.arange(position_ids.shape[-1], device=position_ids.device).expand_as(position_ids)


def build_qwen3(shape: Qwen3Shape, config, *, use_te: bool | None = None, pre_process: bool | None = None,
                post_process: bool | None = None, vp_stage: int | None = None):
    """A GPTModel for this pipeline stage (stage flags default to megatron's parallel state)."""
    from megatron.core import parallel_state

    if use_te is None:
        use_te = transformer_engine_available()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = _gpt_model_class()(
        config=config,
        transformer_layer_spec=layer_spec(shape, use_te=use_te),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="yarn" if shape.yarn_factor is not None else "rope",
        rotary_base=int(shape.rope_theta),
        rotary_percent=1.0,
        vp_stage=vp_stage,
    )
    if hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb = PositionAwareRotary(model.rotary_pos_emb)
    return model
