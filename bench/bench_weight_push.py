"""Weight push speed: trainer -> colocated vLLM, seconds per GB, against a plain copy of the same bytes.

After every GRPO step the trainer's megatron shards are gathered over TP, renamed to HF
tensors (inference/weight_push.py) and streamed into vLLM's in-place reload
(ColocatedVLLMEngine.push). The limit is a plain copy of the same bytes into preallocated
tensors of the same shapes: what any push must at least do. Both are timed here per TP
rank on the same model, the random-init Qwen3-0.6B shape in bf16 (vLLM starts from dummy
weights), at TP=1 and at TP=2 (two real processes sharing the world with vLLM's external
launcher). The push gate (one probe forward on each side) is timed apart.

    python bench/bench_weight_push.py                  # 0.6b, TP 1 and 2
    python bench/bench_weight_push.py --shape 8x1024 --tp 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.model_shapes import hf_config_dict  # noqa: E402

BENCH = "weight_push"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="0.6b")
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes")
    parser.add_argument("--steps", type=int, default=3, help="timed pushes (the median is reported)")
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--out-dir", default="runs/bench")
    return parser.parse_args(argv)


def write_config_folder(shape: str, folder: Path) -> Path:
    """config.json + a tokenizer: all a dummy-loaded vLLM and the megatron builder read."""
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_dict(shape), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    make_tiny_tokenizer(folder)
    return folder


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rank(hf_dir: str, tp: int, steps: int, bucket_mb: int) -> dict:
    from gazal_nemo.inference.push_gate import PushGate
    from gazal_nemo.inference.vllm_engine import ColocatedVLLMEngine, VLLMSettings
    from gazal_nemo.inference.weight_push import hf_weight_buckets
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=tp)
    shape = Qwen3Shape.from_pretrained(hf_dir)
    model = build_qwen3(shape, transformer_config(shape, tp=tp, params_dtype=torch.bfloat16)).eval()
    settings = VLLMSettings(weight_sync_bucket_mb=bucket_mb, gate_tolerance=10.0)  # random weights: time, not judge
    gate = PushGate(model, list(range(10, 74)), dtype=torch.bfloat16, tolerance=settings.gate_tolerance)
    engine = ColocatedVLLMEngine.build(model=model, shape=shape, hf_dir=hf_dir, settings=settings, tp=tp, dp=1,
                                       dtype="bf16", seed=0, max_model_len=256, stop_token_ids=[], gate=gate)
    bucket_bytes = bucket_mb << 20
    engine.sync_weights(0)  # warm-up: the first push also allocates vLLM's reload buffers
    sizes = []

    def push():
        sizes.append(engine.push(hf_weight_buckets(model, shape, bucket_bytes=bucket_bytes), 1)[0])

    push_s = _median_time(push, steps)
    tensors = [t for bucket in hf_weight_buckets(model, shape, bucket_bytes=bucket_bytes) for _, t in bucket]
    targets = [torch.empty_like(t) for t in tensors]

    def copy():
        for target, tensor in zip(targets, tensors):
            target.copy_(tensor)

    copy_s = _median_time(copy, steps)
    gate_s = _median_time(lambda: gate.check(engine, 1), steps)
    engine.close()
    gigabytes = sizes[-1] / 1e9
    return {"tp": tp, "bytes": sizes[-1], "push_s": push_s, "copy_s": copy_s, "gate_s": gate_s,
            "push_s_per_gb": push_s / gigabytes, "copy_s_per_gb": copy_s / gigabytes,
            "push_over_copy": push_s / copy_s, "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    from gazal_nemo.testing.multiproc import run_distributed

    args = parse_args(argv)
    reporter = common.Reporter(BENCH, args.out_dir, common.resolve_device("auto"))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = write_config_folder(args.shape, Path(tmp) / "model")
        for tp in (int(x) for x in args.tp.split(",")):
            per_rank = run_distributed(measure_rank, tp, str(hf_dir), tp, args.steps, args.bucket_mb)
            reporter.emit({"shape": args.shape, "bucket_mb": args.bucket_mb, "tp": tp, "rank0": per_rank[0],
                           "slowest_rank_push_s": max(r["push_s"] for r in per_rank)})
            r = per_rank[0]
            print(f"tp {tp}: {r['bytes'] / 1e9:.2f} GB per rank, push {r['push_s_per_gb']:.3f} s/GB, "
                  f"copy {r['copy_s_per_gb']:.3f} s/GB, push/copy {r['push_over_copy']:.2f}, gate {r['gate_s']:.3f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
