"""The weight push to a rollout engine: TP shards gathered back into exact HF tensors,
in buckets of bounded size (what vLLM's load_weights receives)."""

import torch
from safetensors.torch import load_file

from gazal_nemo.testing.multiproc import run_distributed


def _buckets(hf_dir, tp, bucket_bytes):

    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.inference.weight_push import hf_weight_buckets
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=tp)
    shape, model = qwen3_from_hf(hf_dir, tp=tp)
    return [[(name, t.clone()) for name, t in bucket] for bucket in hf_weight_buckets(model, shape, bucket_bytes=bucket_bytes)]


def test_tp2_push_reassembles_exact_hf_tensors_in_buckets(tiny_hf_dir):
    original = {}
    for shard in sorted(tiny_hf_dir.glob("*.safetensors")):
        original.update(load_file(shard))
    bucket_bytes = 64 * 1024
    per_rank = run_distributed(_buckets, 2, str(tiny_hf_dir), 2, bucket_bytes)
    assert [[n for n, _ in b] for b in per_rank[0]] == [[n for n, _ in b] for b in per_rank[1]]
    pushed = dict(item for bucket in per_rank[0] for item in bucket)
    assert set(pushed) == set(original)
    for name, tensor in original.items():
        assert torch.equal(pushed[name], tensor), name
    assert len(per_rank[0]) > 1, "everything went in one bucket: bucketing untested"
    largest_tensor = max(t.numel() * t.element_size() for t in original.values())
    for bucket in per_rank[0][:-1]:
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert bucket_bytes <= size < bucket_bytes + 3 * largest_tensor
