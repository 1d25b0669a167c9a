"""Qwen3 shapes for the benchmarks, and the random-init models built from them.

Benchmarks build random-init models (no hub download): throughput and memory depend on
the shape, not on the weights. The three real shapes copy the published Qwen3
config.json values; "tiny" is the CPU smoke-test shape (the test fixture's geometry with head_dim 32,
the smallest vLLM's CPU kernels take: GQA
4 heads / 2 groups, qk-norm, the vocabulary of the tiny tokenizer).

Both sides of every comparison are built here so their settings sit side by side:
`build_ours` is the production path (torch-native megatron spec with SDPA attention,
megatron DDP with fp32 gradient buffers, megatron's mixed-precision optimizer with fp32
main weights, the same hooks `train_loop` installs); `build_hf` is transformers'
Qwen3ForCausalLM with SDPA attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench import common

_QWEN3_COMMON = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=151936,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=40960,
    attention_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
    bos_token_id=151643,
    eos_token_id=151645,
)

SHAPES: dict[str, dict] = {
    "tiny": dict(
        _QWEN3_COMMON, vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
    ),
    # Rollout benchmarks on CPU: large enough that compute shows, small enough for 2 cores
    # (8 layers x hidden 1024, the real vocabulary); head_dim 64, which vLLM's CPU kernels take.
    "8x1024": dict(
        _QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-0.6B config.json
    "0.6b": dict(
        _QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-1.7B config.json
    "1.7b": dict(
        _QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True,
    ),
    # Qwen/Qwen3-8B config.json
    "8b": dict(
        _QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
    ),
}


def parse_shapes(text: str) -> list[str]:
    """The comma-separated --shape list, each checked against SHAPES."""
    shapes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"--shape {text!r}: unknown {unknown}; allowed: {', '.join(SHAPES)}")
    return shapes


def hf_config_dict(name: str) -> dict:
    """A copy of the config.json dict of shape `name`."""
    if name not in SHAPES:
        raise ValueError(f"--shape {name!r}; allowed: {', '.join(SHAPES)}")
    return dict(SHAPES[name])


def qwen3_shape(name: str):
    """The megatron-side Qwen3Shape of shape `name`."""
    from gazal_nemo.models.qwen3 import Qwen3Shape

    return Qwen3Shape.from_hf_dict(hf_config_dict(name), source=f"bench shape {name!r}")


def hf_qwen3_config(name: str):
    """transformers.Qwen3Config of shape `name` with SDPA attention and no KV cache for training."""
    from transformers import Qwen3Config

    fields = hf_config_dict(name)
    fields.pop("model_type")
    config = Qwen3Config(**fields)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def num_parameters(name: str) -> int:
    """Parameter count of shape `name` (embedding counted once when tied), for FLOP estimates."""
    cfg = SHAPES[name]
    hidden, heads, groups, d = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                cfg["head_dim"])
    attention = hidden * (heads + 2 * groups) * d + heads * d * hidden + 2 * d  # q, k, v, o, q/k norms
    mlp = 3 * hidden * cfg["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden  # two RMSNorms
    embeddings = cfg["vocab_size"] * hidden * (1 if cfg["tie_word_embeddings"] else 2)
    return cfg["num_hidden_layers"] * per_layer + embeddings + hidden  # final norm


def train_flops_per_token(name: str, seq_length: int) -> float:
    """Model FLOPs per trained token (forward + backward, recompute not counted, as MFU counts).

    6 per parameter of every matmul a token goes through (the decoder linears and the
    output layer, tied or not) plus causal attention: QK^T and PV over on average S/2 keys.
    """
    cfg = SHAPES[name]
    hidden, heads, groups, d = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                cfg["head_dim"])
    linears = hidden * (heads + 2 * groups) * d + heads * d * hidden + 3 * hidden * cfg["intermediate_size"]
    matmul_params = cfg["num_hidden_layers"] * linears + cfg["vocab_size"] * hidden
    attention = cfg["num_hidden_layers"] * 6 * seq_length * heads * d  # 3 x (2 matmuls x 2 FLOPs x S/2)
    return 6.0 * matmul_params + attention


@dataclass
class OursTrainer:
    """Our training stack for one model, ready for `gazal_nemo.training.step.run_step`."""

    shape: object  # Qwen3Shape
    config: object  # megatron TransformerConfig
    chunk: torch.nn.Module  # megatron DDP around the GPTModel
    optimizer: object  # megatron optimizer
    scheduler: object
    after_step: object  # callable or None (DoRA: invalidate the cached weight norms)

    @property
    def model(self):
        from gazal_nemo.training.model_setup import unwrap

        return unwrap(self.chunk)

    def release(self) -> None:
        """Let the garbage collector free this model once the benchmark drops it.

        Two references outlive the benchmark otherwise (checked on CPU with a weakref):
        megatron's DDP keeps each parameter's grad-accumulator node, whose hook refers
        back to the DDP module, in `grad_accs` (a cycle through autograd's C++ nodes, which
        Python's collector cannot see), and the TransformerConfig, which megatron keeps
        reachable, holds the optimizer and DDP through the schedule hooks. Without this
        every variant run later in the same process would find this model still on the device.
        """
        self.chunk.grad_accs.clear()
        for hook in ("finalize_model_grads_func", "grad_scale_func", "no_sync_func"):
            setattr(self.config, hook, None)


def build_ours(name: str, *, recompute: str, adapter_cfg=None, optimizer: str = "adamw", lr: float = 1e-5,
               weight_decay: float = 0.1, total_steps: int = 100, distributed_optimizer: bool = True,
               seed: int = 0) -> OursTrainer:
    """Random-init bf16 Qwen3 (adapter applied when given), DDP, optimizer, schedule, hooks.

    Call after megatron's parallel state is initialised. `recompute` is "none" or "full".
    """
    from gazal_nemo.models.qwen3 import build_qwen3, transformer_config
    from gazal_nemo.recipe_sections import OptimConfig, ParallelConfig, PrecisionConfig
    from gazal_nemo.training.model_setup import wrap_ddp
    from gazal_nemo.training.optim import build_optimizer, build_scheduler
    from gazal_nemo.training.step import configure_schedule_hooks

    torch.manual_seed(seed)
    shape = qwen3_shape(name)
    config = transformer_config(shape, params_dtype=torch.bfloat16, recompute=None if recompute == "none" else recompute,
                                calculate_per_token_loss=True)
    model = build_qwen3(shape, config, use_te=False)
    after_step = None
    if adapter_cfg is not None:
        from gazal_nemo.peft.dora import apply_adapter, invalidate_dora_norms

        apply_adapter(model, adapter_cfg, shape, seed=seed)
        if adapter_cfg.use_dora:
            after_step = lambda: invalidate_dora_norms(model)  # noqa: E731
    parallel = ParallelConfig(distributed_optimizer=distributed_optimizer)
    chunk = wrap_ddp(model, config, parallel)
    optim = OptimConfig(name=optimizer, lr=lr, weight_decay=weight_decay, warmup_ratio=0.0, schedule="constant",
                        grad_clip=1.0)
    megatron_optimizer = build_optimizer([chunk], optim, PrecisionConfig(dtype="bf16"),
                                         distributed=distributed_optimizer)
    scheduler = build_scheduler(megatron_optimizer, optim, total_steps=total_steps)
    configure_schedule_hooks(config, [chunk], megatron_optimizer)
    return OursTrainer(shape=shape, config=config, chunk=chunk, optimizer=megatron_optimizer, scheduler=scheduler,
                       after_step=after_step)


def build_hf(name: str, *, device: torch.device, dtype: torch.dtype, recompute: str, use_cache: bool = False,
             seed: int = 0):
    """transformers Qwen3ForCausalLM (SDPA attention), random init directly on `device` in `dtype`.

    recompute "full" turns on non-reentrant gradient checkpointing of every decoder layer,
    the counterpart of megatron's full uniform recompute of every layer.
    """
    from transformers import AutoModelForCausalLM

    config = hf_qwen3_config(name)
    config.use_cache = use_cache
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif recompute != "none":
        raise ValueError(f"--recompute {recompute!r}; allowed: none, full")
    model.train()
    return model


def causal_lm_batch(vocab_size: int, *, seq_length: int, micro_batch_size: int, device: torch.device,
                    seed: int) -> dict:
    """One random-token micro-batch, one document per row, every token in the loss.

    Keys as `gazal_nemo.stages.sft.sft_forward_step` reads them (labels already shifted,
    attention_mask None = plain causal attention); HF takes `input_ids` with
    `labels=input_ids` and shifts inside, so both sides see the same tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=gen)
    return {
        "input_ids": ids[:, :-1].contiguous().to(device),
        "labels": ids[:, 1:].contiguous().to(device),
        "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length).contiguous().to(device),
        "attention_mask": None,
        "loss_mask": torch.ones(micro_batch_size, seq_length, dtype=torch.float32, device=device),
    }


def time_ours_sft_steps(trainer: OursTrainer, args, device) -> dict:
    """Time our SFT step (the stage's own loss through megatron's schedule) on one random
    batch; releases the trainer afterwards. Shared by the throughput and DoRA benches."""
    from gazal_nemo.stages.sft import sft_forward_step
    from gazal_nemo.training.step import run_step

    batch = causal_lm_batch(trainer.shape.vocab_size, seq_length=args.seq_length,
                            micro_batch_size=args.micro_batch_size, device=device, seed=args.seed)

    def step():
        metrics = run_step(chunks=[trainer.chunk], optimizer=trainer.optimizer, scheduler=trainer.scheduler,
                           forward_step=sft_forward_step, microbatches=[batch], seq_length=args.seq_length,
                           micro_batch_size=args.micro_batch_size, after_step=trainer.after_step)
        loss_sum, tokens = metrics["loss"].tolist()
        return {"loss": loss_sum / max(tokens, 1), "grad_norm": metrics["grad_norm"], "skipped": metrics["skipped"]}

    try:
        return common.time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
    finally:
        trainer.release()


def time_hf_steps(model, params, args, device, *, lr: float, weight_decay: float, grad_clip: float) -> dict:
    """Time the Hugging Face baseline step (AdamW, bf16 autocast, clipped grads) on one random
    batch, the same batch `time_ours_sft_steps` uses. Shared by the throughput and DoRA benches."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batch = causal_lm_batch(model.config.vocab_size, seq_length=args.seq_length,
                            micro_batch_size=args.micro_batch_size, device=device, seed=args.seed)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    return common.time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
