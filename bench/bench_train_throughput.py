"""Full-parameter training throughput: our megatron stack next to Hugging Face transformers.

The foundation issue's question: does the torch-native megatron spec (no Transformer
Engine) train a Qwen3 at least as fast as the obvious alternative? Both sides train a
random-init Qwen3 of the same shape on the same random tokens, one document of
`--seq-length` tokens per row, `--micro-batch-size` rows per step, one micro-batch per
optimizer step, AdamW (lr 1e-5, weight decay 0.1, grad clip 1.0), bf16 compute with fp32
master weights:

  ours  megatron GPTModel (torch-native spec, SDPA core attention), megatron DDP with an
        fp32 gradient buffer, megatron's mixed-precision optimizer (bf16 params, fp32 main
        params) over torch AdamW, one step through `run_step` with the SFT loss.
  hf    transformers Qwen3ForCausalLM (attn_implementation "sdpa"), fp32 parameters under
        torch.autocast(bfloat16) (what HF Trainer's bf16=True does with an fp32 model),
        torch.optim.AdamW, clip_grad_norm_.

Activation recompute is off on both sides by default (`--recompute full` turns on
megatron's full recompute and HF's gradient checkpointing). Reported: tokens/s (median
step), peak device memory, model TFLOP/s and MFU against the dense bf16 peak (or `--peak-tflops`).

    python bench/bench_train_throughput.py --shape 1.7b --seq-length 4096       # GPU
    python bench/bench_train_throughput.py --shape tiny --device cpu --seq-length 128 --steps 2
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
    train_flops_per_token,
)

BENCH = "train_throughput"
VARIANTS = ("hf", "ours")  # baselines first: no HF model may be built after init_parallel
LR, WEIGHT_DECAY, GRAD_CLIP = 1e-5, 0.1, 1.0


def parse_args(argv=None):
    parser = common.base_parser(__doc__.split("\n")[0], default_shape="1.7b", variants=VARIANTS)
    parser.add_argument("--seq-length", type=int, default=None, help="default 4096 (tiny: 128)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--recompute", default="none", choices=("none", "full"))
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "exadam"),
                        help="our update rule (the baseline is always torch AdamW)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 TFLOP/s that MFU is relative to; default: the device's datasheet dense "
                             "bf16 peak (gazal_nemo.training.metrics), none on CPU. The GPU suite passes the "
                             "H200's measured matmul rate, 790")
    args = parser.parse_args(argv)
    common.fill_defaults(args, full=dict(seq_length=4096, warmup=2, steps=4),
                         smoke=dict(seq_length=128, warmup=2, steps=3))
    return args


def measure_hf(name: str, args, device: torch.device) -> dict:
    model = build_hf(name, device=device, dtype=torch.float32, recompute=args.recompute, seed=args.seed)
    params = list(model.parameters())
    run = time_hf_steps(model, params, args, device, lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP)
    return _fields(name, args, device, run, hf_weights="fp32 + autocast bf16")


def measure_ours(name: str, args, device: torch.device) -> dict:
    common.init_megatron(args.seed)
    trainer = build_ours(name, recompute=args.recompute, optimizer=args.optimizer, lr=LR, weight_decay=WEIGHT_DECAY,
                         total_steps=args.warmup + args.steps, seed=args.seed)
    run = time_ours_sft_steps(trainer, args, device)
    return _fields(name, args, device, run, optimizer=args.optimizer)


def _fields(name: str, args, device, run: dict, **extra) -> dict:
    from gazal_nemo.training.metrics import device_peak_tflops

    summary = common.timing_summary(run["step_times_s"])
    tokens = args.seq_length * args.micro_batch_size
    tokens_per_s = tokens / summary["step_time_median_s"]
    tflops = tokens_per_s * train_flops_per_token(name, args.seq_length) / 1e12
    peak = args.peak_tflops or device_peak_tflops()
    return {**summary, "step_times_s": run["step_times_s"], "tokens_per_step": tokens, "tokens_per_s": tokens_per_s,
            "peak_mem_gib": common.peak_memory_gib(device), "model_tflops_per_s": tflops,
            "mfu": tflops / peak if peak else None, "mfu_peak_tflops": peak, "last_step": run["last"], **extra}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    variants = common.parse_variants(args.variants, VARIANTS)
    shapes = parse_shapes(args.shape)
    reporter = common.Reporter(BENCH, args.out_dir, device)
    measure = {"hf": measure_hf, "ours": measure_ours}
    jobs = []
    for variant in variants:  # every baseline before any megatron variant (see VARIANTS)
        for name in shapes:
            identity = {"variant": variant, "shape": name, "dtype": "bf16", "seq_length": args.seq_length,
                        "micro_batch_size": args.micro_batch_size, "recompute": args.recompute,
                        "warmup_steps": args.warmup}
            jobs.append((identity, lambda v=variant, n=name: measure[v](n, args, device)))
    records = common.run_variants(reporter, jobs, args=args, device=device)
    print(report(reporter, records, shapes, args))
    return records


def report(reporter, records: list[dict], shapes: list[str], args) -> str:
    rows, comparisons = [], []
    for r in records:
        rows.append([r["variant"], r["shape"], r.get("status"), r.get("tokens_per_s"), r.get("step_time_median_s"),
                     r.get("peak_mem_gib"), r.get("model_tflops_per_s"), r.get("mfu")])
    for name in shapes:
        ours, hf = common.find(records, variant="ours", shape=name), common.find(records, variant="hf", shape=name)
        cfg = hf_config_dict(name)
        settings = (f"Qwen3-{name} shape ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}), random init, "
                    f"full-parameter, bf16 + fp32 master, seq {args.seq_length}, mbs {args.micro_batch_size}, "
                    f"recompute {args.recompute}, AdamW; median of {args.steps} after {args.warmup} warm-up")
        comparisons += common.speed_and_memory_rows(reporter.env, settings, ours, hf)
    text = ("## Training throughput: ours (megatron, torch spec) vs HF transformers\n\n"
            + common.markdown_table(["variant", "shape", "status", "tokens/s", "step s (median)", "peak GiB",
                                     "model TFLOP/s", "MFU"], rows)
            + "\n" + common.markdown_table(common.PERFORMANCE_HEADER, comparisons))
    path = reporter.write_markdown(text)
    return text + f"\n(written to {path} and {reporter.jsonl})\n"


if __name__ == "__main__":
    main()
