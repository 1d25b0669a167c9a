"""Optional rollout engine: vLLM colocated in the training processes (`pip install .[vllm]`).

Each training rank runs one vLLM engine in its own process (`distributed_executor_backend=
"external_launcher"`), with vLLM's tensor-parallel size equal to megatron's, so the
engine of TP rank r lives on the same GPU as the trainer's TP shard r. After every
optimizer step the trainer's weights are pushed into vLLM:
  * megatron shards are gathered over the TP group and renamed to HF names with the
    converter's table (gazal_nemo.convert.mapping), so vLLM re-shards them to its own TP
    layout with its own `load_weights`;
  * tensors go in buckets of `rollout.weight_sync_bucket_mb` (one `load_weights` call per
    bucket), not one call per tensor, which is the known bottleneck of naive syncs;
  * vLLM sleeps (frees its KV cache) while the trainer runs, and wakes to generate.
Adapters are merged into the base weights for the push and unmerged afterwards.

Needs a GPU and vLLM; nothing in the CPU test suite can run it (see docs/GRPO.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gazal_nemo.rl.rollout import Completion


def _require_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ValueError("grpo.rollout.engine='vllm' needs vLLM: pip install 'gazal-nemo[vllm]' "
                         "(or use engine 'megatron')") from e
    if not torch.cuda.is_available():
        raise ValueError("grpo.rollout.engine='vllm' needs a GPU; use engine 'megatron' on CPU")
    return vllm


def hf_weight_buckets(model, shape, *, bucket_bytes: int):
    """Yield lists of (hf_name, full tensor) of about bucket_bytes each, gathered over TP.

    Every TP rank takes part in the gathers and gets the same full tensors (vLLM's own
    load_weights keeps the slice its rank needs).
    """
    from megatron.core import parallel_state as ps

    from gazal_nemo.convert.mapping import local_name, stage_params, te_name, to_hf, tp_gather

    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    own = dict(model.state_dict(keep_vars=True))
    bucket, size = [], 0
    for param in stage_params(shape, pp_rank=0, pp_size=1):
        name = local_name(param.name, 0)
        tensor = own.get(name, own.get(te_name(name)))
        if tensor is None:
            raise KeyError(f"model has no parameter {param.name} to push to vLLM")
        tensor = tensor.detach()
        if tp_size > 1 and param.layout != "rep":
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = tp_gather(parts, param.layout)
        for hf_name, hf_tensor in to_hf(param, tensor, shape).items():
            bucket.append((hf_name, hf_tensor))
            size += hf_tensor.numel() * hf_tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _vllm_model(llm):
    """The nn.Module inside a colocated vLLM engine (the attribute path moved between releases)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    for path in ("worker.model_runner.model", "model_runner.model"):
        obj = worker
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return obj
        except AttributeError:
            continue
    raise RuntimeError("cannot find the model inside this vLLM version's engine; pin vllm to a tested release")


class VLLMRolloutEngine:
    """Colocated vLLM with bucketed weight pushes from the megatron trainer."""

    def __init__(self, llm, model, shape, *, stop_token_ids, bucket_mb: int):
        self.llm, self.model, self.shape = llm, model, shape
        self.stop_ids = list(stop_token_ids)
        self.bucket_bytes = bucket_mb * 2**20

    @classmethod
    def from_recipe(cls, recipe, model, shape, stop_token_ids):
        vllm = _require_vllm()
        if recipe.parallel.pp != 1:
            raise ValueError("grpo.rollout.engine='vllm' is colocated per TP group: parallel.pp must be 1")
        sampling = recipe.grpo.sampling
        llm = vllm.LLM(
            model=recipe.model.hf_path, tensor_parallel_size=recipe.parallel.tp,
            distributed_executor_backend="external_launcher", dtype=recipe.precision.dtype.replace("bf16", "bfloat16"),
            gpu_memory_utilization=recipe.grpo.rollout.vllm_gpu_memory_utilization,
            max_model_len=recipe.grpo.data.max_prompt_length + sampling.max_new_tokens,
            seed=recipe.train.seed, enable_sleep_mode=True,
        )
        llm.sleep(level=1)  # the trainer has the GPU until the first rollout
        return cls(llm, model, shape, stop_token_ids=stop_token_ids, bucket_mb=recipe.grpo.rollout.weight_sync_bucket_mb)

    @torch.no_grad()
    def sync_weights(self) -> None:
        from gazal_nemo.peft.dora import adapted_layers, merge_adapter, unmerge_adapter

        merged = bool(adapted_layers(self.model))
        if merged:
            merge_adapter(self.model)
        try:
            target = _vllm_model(self.llm)
            for bucket in hf_weight_buckets(self.model, self.shape, bucket_bytes=self.bucket_bytes):
                target.load_weights(weights=bucket)
        finally:
            if merged:
                unmerge_adapter(self.model)
        self.llm.reset_prefix_cache()

    def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, seed) -> list[Completion]:
        from vllm import SamplingParams

        self.llm.wake_up()
        self.sync_weights()  # the weights of the last optimizer step
        params = SamplingParams(n=1, temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p,
                                max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                                seed=seed, logprobs=0)  # 0: the sampled token's own log-prob (for TIS)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        self.llm.sleep(level=1)
        completions = []
        for index, out in enumerate(outputs):
            sample = out.outputs[0]
            completions.append(Completion(prompt_index=index, tokens=list(sample.token_ids),
                                          truncated=sample.finish_reason == "length",
                                          logprobs=_sampled_logprobs(sample)))
        return completions


def _sampled_logprobs(sample) -> list[float] | None:
    """vLLM returns one {token_id: Logprob} dict per generated token; keep the sampled one's."""
    if sample.logprobs is None:
        return None
    return [float(step[token].logprob) for token, step in zip(sample.token_ids, sample.logprobs)]
