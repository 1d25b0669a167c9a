"""DoRA / LoRA SFT throughput: our megatron adapters next to Hugging Face transformers + PEFT.

The SFT issue's two targets, on a Qwen3-8B shape at seq 4096 on one GPU (an H200 in the GPU suite):
  ours DoRA / HF+PEFT DoRA tokens/s  >= 4x
  ours DoRA / ours LoRA tokens/s     >= 0.85 (DoRA within 15% of LoRA)

Adapter settings (the paper's SFT adapter, Appendix A.1): rank 256, alpha 512, rsLoRA
(scale alpha/sqrt(r)), every linear of every decoder layer (PEFT's target_modules
"all-linear" = q, k, v, o, gate, up, down; megatron's linear_qkv, linear_proj,
linear_fc1, linear_fc2), activation recompute on both sides (megatron full uniform
recompute of every layer / HF non-reentrant gradient checkpointing of every layer).
Variants:
  *-dora, *-lora   dropout 0: every DoRA form computes the same function
  *-dora-drop      dropout --dropout (paper 0.1): ours in the "lowrank" mode
                   (m/n)(Wx + sBA drop(x)); PEFT in its own exact form, which runs the
                   base weight a second time on the dropped input
Both sides: frozen bf16 base weights from a random init, one micro-batch of one
document of --seq-length random tokens per optimizer step, AdamW (lr 1e-5, weight
decay 0.1, clip 1.0). Ours keeps bf16 adapter params with fp32 main copies in megatron's
optimizer and refreshes the cached DoRA norms after each step (`invalidate_dora_norms`);
PEFT keeps fp32 adapter weights (its autocast_adapter_dtype default) under
torch.autocast(bfloat16). The trainable-parameter counts of both sides are recorded
and must match.

    python bench/bench_dora_sft.py --shape 1.7b,8b --isolate                 # GPU
    python bench/bench_dora_sft.py --shape tiny --device cpu --seq-length 128 --steps 2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.model_shapes import (  # noqa: E402
    build_hf,
    build_ours,
    hf_config_dict,
    parse_shapes,
    time_hf_steps,
    time_ours_sft_steps,
)

BENCH = "dora_sft"
# variant -> (implementation, use_dora, with dropout); baselines first (no HF model after init_parallel)
VARIANT_SPECS = {
    "hf-dora": ("hf", True, False),
    "hf-lora": ("hf", False, False),
    "hf-dora-drop": ("hf", True, True),
    "ours-dora": ("ours", True, False),
    "ours-lora": ("ours", False, False),
    "ours-dora-drop": ("ours", True, True),
}
VARIANTS = tuple(VARIANT_SPECS)
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.1, 1.0
TARGET_DORA_VS_HF = 4.0
TARGET_DORA_VS_LORA = 0.85


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], default_shape="1.7b,8b", variants=VARIANTS)
    parser.add_argument("--seq-length", type=int, default=None, help="default 4096 (tiny: 128)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--alpha", type=float, default=512.0)
    parser.add_argument("--dropout", type=float, default=0.1, help="adapter dropout of the *-drop variants")
    parser.add_argument("--recompute", default="full", choices=("none", "full"))
    args = parser.parse_args(argv)
    common.fill_defaults(args, full=dict(seq_length=4096, warmup=2, steps=4),
                         smoke=dict(seq_length=128, warmup=1, steps=3))
    if not 0 < args.dropout < 1:
        raise ValueError(f"--dropout {args.dropout}; allowed: 0 < dropout < 1 (the *-drop variants need dropout)")
    return args


def _dropout(variant: str, args) -> float:
    return args.dropout if VARIANT_SPECS[variant][2] else 0.0


def measure_hf(variant: str, name: str, args, device: torch.device) -> dict:
    from peft import LoraConfig, get_peft_model

    _, use_dora, _ = VARIANT_SPECS[variant]
    base = build_hf(name, device=device, dtype=torch.bfloat16, recompute=args.recompute, seed=args.seed)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, use_rslora=True, use_dora=use_dora,
                      lora_dropout=_dropout(variant, args), target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    run = time_hf_steps(model, trainable, args, device, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    return _fields(args, device, run, trainable_params=sum(p.numel() for p in trainable),
                   adapter_param_dtype=str(trainable[0].dtype))


def measure_ours(variant: str, name: str, args, device: torch.device) -> dict:
    from gazal_nemo.peft.config import AdapterConfig
    _, use_dora, _ = VARIANT_SPECS[variant]
    common.init_megatron(args.seed)
    adapter = AdapterConfig(rank=args.rank, alpha=args.alpha, dropout=_dropout(variant, args), use_dora=use_dora,
                            use_rslora=True, dropout_mode="lowrank")
    trainer = build_ours(name, recompute=args.recompute, adapter_cfg=adapter, lr=LR, weight_decay=WEIGHT_DECAY,
                         total_steps=args.warmup + args.steps, seed=args.seed)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    run = time_ours_sft_steps(trainer, args, device)
    return _fields(args, device, run, trainable_params=sum(p.numel() for p in trainable),
                   adapter_param_dtype=str(trainable[0].dtype), dropout_mode="lowrank")


def _fields(args, device, run: dict, **extra) -> dict:
    summary = common.timing_summary(run["step_times_s"])
    tokens = args.seq_length * args.micro_batch_size
    return {**summary, "step_times_s": run["step_times_s"], "tokens_per_step": tokens,
            "tokens_per_s": tokens / summary["step_time_median_s"], "peak_mem_gib": common.peak_memory_gib(device),
            "last_step": run["last"], **extra}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    variants = common.parse_variants(args.variants, VARIANTS)
    shapes = parse_shapes(args.shape)
    reporter = common.Reporter(BENCH, args.out_dir, device)
    jobs = []
    for variant in variants:  # every baseline before any megatron variant
        impl = VARIANT_SPECS[variant][0]
        for name in shapes:
            identity = {"variant": variant, "impl": impl, "shape": name, "dtype": "bf16",
                        "seq_length": args.seq_length, "micro_batch_size": args.micro_batch_size, "rank": args.rank,
                        "alpha": args.alpha, "use_rslora": True, "use_dora": VARIANT_SPECS[variant][1],
                        "dropout": _dropout(variant, args), "recompute": args.recompute, "warmup_steps": args.warmup}
            fn = measure_hf if impl == "hf" else measure_ours
            jobs.append((identity, lambda v=variant, n=name, f=fn: f(v, n, args, device)))
    records = common.run_variants(reporter, jobs, args=args, device=device)
    print(report(reporter, records, shapes, args))
    return records


def report(reporter, records: list[dict], shapes: list[str], args) -> str:
    rows = [[r["variant"], r["shape"], r.get("status"), r.get("tokens_per_s"), r.get("step_time_median_s"),
             r.get("peak_mem_gib"), r.get("trainable_params"), r.get("adapter_param_dtype")] for r in records]
    comparisons, checks = [], []
    for name in shapes:
        get = {v: common.find(records, variant=v, shape=name) for v in VARIANTS}
        cfg = hf_config_dict(name)
        base = (f"Qwen3-{name} shape ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), random init, "
                f"r {args.rank} alpha {args.alpha:g} rsLoRA all-linear, bf16, seq {args.seq_length}, "
                f"mbs {args.micro_batch_size}, recompute {args.recompute}; median of {args.steps} after "
                f"{args.warmup} warm-up")
        pairs = [("ours-dora", "hf-dora", "DoRA dropout 0, ours vs HF+PEFT"),
                 ("ours-lora", "hf-lora", "LoRA dropout 0, ours vs HF+PEFT"),
                 ("ours-dora-drop", "hf-dora-drop", f"DoRA dropout {args.dropout:g} (ours lowrank mode) vs HF+PEFT"),
                 ("ours-dora", "ours-lora", "DoRA vs LoRA, both ours (baseline column = ours LoRA)")]
        for ours_v, base_v, what in pairs:
            if get[ours_v] is None and get[base_v] is None:
                continue
            comparisons += common.speed_and_memory_rows(reporter.env, f"{what}; {base}", get[ours_v], get[base_v])
        checks += _target_checks(name, get, reporter.env)
    text = ("## DoRA/LoRA SFT: ours (megatron adapters) vs HF transformers + PEFT\n\n"
            + common.markdown_table(["variant", "shape", "status", "tokens/s", "step s (median)", "peak GiB",
                                     "trainable params", "adapter dtype"], rows)
            + "\n" + common.markdown_table(common.PERFORMANCE_HEADER, comparisons)
            + "\n" + "\n".join(checks) + "\n")
    path = reporter.write_markdown(text)
    return text + f"\n(written to {path} and {reporter.jsonl})\n"


def _target_checks(name: str, get: dict, env: dict) -> list[str]:
    """The issue's targets, stated as met / missed; they are claims about an 8B shape on a GPU only."""
    def speed(v):
        r = get.get(v)
        return r.get("tokens_per_s") if r and r.get("status") == "ok" else None

    scope = "" if env.get("device") == "cuda" and name == "8b" else " (informational: the targets are for the 8b shape on a GPU)"
    lines = []
    for ours_v, base_v, target, what in (("ours-dora", "hf-dora", TARGET_DORA_VS_HF, "ours DoRA / HF DoRA"),
                                         ("ours-dora", "ours-lora", TARGET_DORA_VS_LORA, "ours DoRA / ours LoRA")):
        value = common.ratio(speed(ours_v), speed(base_v))
        if value is None:
            lines.append(f"- {name}: {what}: not measured")
            continue
        verdict = "meets" if value >= target else "MISSES"
        lines.append(f"- {name}: {what} = {value:.2f}x, {verdict} the target >= {target:g}x{scope}")
    hf, ours = get.get("hf-dora"), get.get("ours-dora")
    if hf and ours and hf.get("trainable_params") and ours.get("trainable_params"):
        same = hf["trainable_params"] == ours["trainable_params"]
        lines.append(f"- {name}: trainable parameters ours {ours['trainable_params']:,} vs PEFT "
                     f"{hf['trainable_params']:,}: {'equal' if same else 'DIFFERENT (settings do not match)'}")
    return lines


if __name__ == "__main__":
    main()
