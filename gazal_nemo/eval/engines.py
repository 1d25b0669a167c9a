"""What to evaluate and what generates: model references resolved to weights, and three engines.

`resolve_model` turns `--model` (and `--base`) into a `ModelSource`, telling apart
  * a stage step checkpoint (has trainer_state.json): exported to a HF folder first with
    gazal_nemo.convert.step_to_hf.export_step_checkpoint, into the run's work folder;
  * a PEFT adapter folder (adapter_config.json: ours or PEFT's): base from --base or from the
    adapter's base_model_name_or_path;
  * a megatron distributed checkpoint (metadata.json plus hf/ with config and tokenizer);
  * a HF folder or hub id.

Engines share the rollout interface (`generate(prompts, max_new_tokens, temperature,
top_k, top_p, seed) -> [Completion]`) and GRPO's stop tokens (rl.stopping):
  * "megatron": rl.rollout.MegatronRolloutEngine (static KV cache, batched, left-padded) on a
    megatron model at TP = world size (torchrun / srun); weights from the dist checkpoint
    directly or from HF, an adapter applied with our DoRA code and merged;
  * "hf": transformers `generate`, left-padded batches: the small-model path;
  * "vllm": vllm.LLM when installed (GPU only), tensor_parallel_size = --tp.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gazal_nemo.rl.rollout import Completion

ENGINES = ("megatron", "hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """Where the weights, the architecture and the tokenizer of the evaluated model are."""

    kind: str
    """"hf", "megatron", "adapter" or "step" (what --model pointed at)."""
    hf_dir: Path
    """HF folder with config.json and the tokenizer (the base model's, for an adapter)."""
    megatron_ckpt: Path | None = None
    adapter_dir: Path | None = None


def is_rank0() -> bool:
    """Global rank 0 of the launch (also before the process group is up)."""
    from gazal_nemo.parallel import launch_env

    return launch_env().rank == 0


def _on_rank0_then_barrier(fn) -> None:
    import torch.distributed as dist

    if is_rank0():
        fn()
    if dist.is_initialized():
        dist.barrier()


def _step_checkpoint(local: Path) -> Path | None:
    """The step checkpoint `local` names (itself, or the newest complete one of a checkpoint root)."""
    if not local.is_dir():
        return None
    try:
        from gazal_nemo.convert.step_to_hf import step_checkpoint_dir
    except ImportError:
        return local if (local / "trainer_state.json").is_file() else None
    return step_checkpoint_dir(local)


def _export_step(step_dir: Path, work_dir: Path) -> Path:
    """HF folder of a step checkpoint, exported once into the work folder (rank 0; the others wait).

    With the megatron engine the process group is up by now, so the exporter merges an
    adapter in its own one-process subprocess instead of joining the job's group."""
    try:
        from gazal_nemo.convert.step_to_hf import export_step_checkpoint
    except ImportError:
        raise ValueError(f"{step_dir}: a stage step checkpoint, but this checkout has no "
                         "gazal_nemo.convert.step_to_hf to export it; export it to HF first") from None
    out = work_dir / f"step_export_{step_dir.name}"
    if not (out / "config.json").is_file():
        if is_rank0():
            print(f"eval: exporting step checkpoint {step_dir} to {out}", flush=True)
        _on_rank0_then_barrier(lambda: export_step_checkpoint(step_dir, out, overwrite=True))
    return out


def resolve_model(model: str, *, base: str | None = None, work_dir: Path, dry_run: bool = False) -> ModelSource:
    """--model/--base -> ModelSource; a mistyped path is a FileNotFoundError, not a hub lookup.

    dry_run: exports nothing and downloads only config.json (the layout check needs no weights)."""
    from gazal_nemo.hub import resolve_model_dir

    local = Path(model).expanduser()
    step = _step_checkpoint(local)
    if step is not None:
        if dry_run:
            return ModelSource(kind="step", hf_dir=step)
        return ModelSource(kind="step", hf_dir=_export_step(step, work_dir))
    if local.is_dir() and (local / "adapter_config.json").is_file():
        saved = json.loads((local / "adapter_config.json").read_text())
        base = base or saved.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{local}: an adapter without base_model_name_or_path; pass --base")
        base_source = resolve_model(base, work_dir=work_dir, dry_run=dry_run)
        if base_source.kind not in ("hf", "megatron"):
            raise ValueError(f"--base {base}: must be a HF folder, hub id or megatron checkpoint")
        return ModelSource(kind="adapter", hf_dir=base_source.hf_dir, megatron_ckpt=base_source.megatron_ckpt,
                           adapter_dir=local)
    if base:
        raise ValueError(f"--base is for adapter folders; {model} has no adapter_config.json")
    if local.is_dir() and (local / "metadata.json").is_file():
        from gazal_nemo.convert.dist_ckpt import HF_SUBDIR

        if not (local / HF_SUBDIR / "config.json").is_file():
            raise ValueError(f"{local}: a megatron checkpoint without {HF_SUBDIR}/config.json (config and tokenizer)")
        return ModelSource(kind="megatron", hf_dir=local / HF_SUBDIR, megatron_ckpt=local)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ValueError(f"{local}: not a HF model folder (no config.json), adapter, megatron or step checkpoint")
    try:
        return ModelSource(kind="hf", hf_dir=resolve_model_dir(model, config_only=dry_run))
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {model!r}: no such folder and not a hub id like 'Qwen/Qwen3-32B'") from None


def check_layout(source: ModelSource, *, engine: str, tp: int, world_size: int) -> str:
    """Refuse a TP size the model or the launch cannot take; one line describing the plan."""
    from gazal_nemo.models.qwen3 import Qwen3Shape

    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}; allowed: {', '.join(ENGINES)}")
    if engine == "hf" and tp != 1:
        raise ValueError("--engine hf runs on one device; use --engine megatron or vllm for --tp > 1")
    if engine == "megatron" and world_size != tp:
        raise ValueError(f"--tp {tp} but {world_size} processes; evaluation runs one model replica: "
                         f"launch --tp processes (torchrun --nproc-per-node {tp})")
    if engine == "vllm" and world_size != 1:
        raise ValueError(f"--engine vllm starts its own {tp} workers: launch one process, not {world_size}")
    if source.kind != "step":  # a step checkpoint's architecture is known after its export
        shape = Qwen3Shape.from_pretrained(source.hf_dir)
        shape.check_parallel(tp=tp, pp=1)
    return f"{source.kind} model {source.hf_dir}, engine {engine}, tp {tp}"


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _device_dtype() -> tuple[str, torch.dtype]:
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


# --- megatron --------------------------------------------------------------------------------


def adapter_config_from_peft(adapter_dir: Path):
    """Our AdapterConfig from a PEFT adapter_config.json (dropout off: this is inference)."""
    from gazal_nemo.peft.config import ADAPTER_TARGETS, AdapterConfig

    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    hf_to_ours = {"q_proj": "linear_qkv", "k_proj": "linear_qkv", "v_proj": "linear_qkv", "o_proj": "linear_proj",
                  "gate_proj": "linear_fc1", "up_proj": "linear_fc1", "down_proj": "linear_fc2"}
    modules = saved.get("target_modules") or "all-linear"
    if modules == "all-linear":
        targets = ADAPTER_TARGETS
    else:
        modules = [modules] if isinstance(modules, str) else modules
        unknown = [m for m in modules if m not in hf_to_ours]
        if unknown:
            raise ValueError(f"{adapter_dir}/adapter_config.json: target_modules {unknown} are not Qwen3 linears")
        targets = tuple(dict.fromkeys(hf_to_ours[m] for m in modules))
    return AdapterConfig(rank=int(saved["r"]), alpha=float(saved["lora_alpha"]), dropout=0.0,
                         use_dora=bool(saved.get("use_dora", False)), use_rslora=bool(saved.get("use_rslora", False)),
                         targets=targets)


def build_megatron_engine(source: ModelSource, *, tp: int, stop_ids: list[int], pad_id: int, max_batch_size: int):
    """This rank's megatron Qwen3 at TP=tp (world size must be tp) wrapped in the rollout engine."""
    from gazal_nemo.convert.load_hf import load_hf_weights
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel, launch_env
    from gazal_nemo.rl.rollout import MegatronRolloutEngine

    check_layout(source, engine="megatron", tp=tp, world_size=launch_env().world_size)
    init_parallel(tp=tp)
    shape = Qwen3Shape.from_pretrained(source.hf_dir)
    shape.check_parallel(tp=tp, pp=1)
    _, dtype = _device_dtype()
    model = build_qwen3(shape, transformer_config(shape, tp=tp, params_dtype=dtype))
    if source.megatron_ckpt is not None:
        from gazal_nemo.convert.dist_ckpt import load_model

        load_model(model, source.megatron_ckpt)
    else:
        load_hf_weights(model, source.hf_dir, shape)
    if source.adapter_dir is not None:
        from gazal_nemo.peft.dora import apply_adapter, merge_adapter
        from gazal_nemo.peft.export import load_peft_adapter

        apply_adapter(model, adapter_config_from_peft(source.adapter_dir), shape)
        load_peft_adapter(model, shape, source.adapter_dir)
        merge_adapter(model)  # one GEMM per linear at inference
    model.eval()
    return MegatronRolloutEngine(model, stop_token_ids=stop_ids, pad_token_id=pad_id, max_batch_size=max_batch_size)


# --- Hugging Face -----------------------------------------------------------------------------


class HFEngine:
    """transformers `generate` on left-padded batches (greedy, or HF's temperature/top-k/top-p)."""

    def __init__(self, model, *, stop_ids: list[int], pad_id: int, max_batch_size: int):
        self.model, self.stop_ids, self.pad_id, self.max_batch_size = model, stop_ids, pad_id, max_batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_k: int,
                 top_p: float, seed: int) -> list[Completion]:
        device = next(self.model.parameters()).device
        out = []
        torch.manual_seed(seed)
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = prompts[start:start + self.max_batch_size]
            longest = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (longest - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
            sampling = (dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p)
                        if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
            generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **sampling)
            for row, tokens in enumerate(generated[:, longest:].tolist()):
                end = next((i + 1 for i, t in enumerate(tokens) if t in self.stop_ids), None)
                out.append(Completion(prompt_index=start + row, tokens=tokens[:end] if end else tokens,
                                      truncated=end is None))
        return out


def build_hf_engine(source: ModelSource, *, work_dir: Path, stop_ids: list[int], pad_id: int, max_batch_size: int):
    from transformers import AutoModelForCausalLM

    device, dtype = _device_dtype()
    hf_dir = source.hf_dir
    if source.megatron_ckpt is not None:  # HF needs HF weights: convert once into the work folder
        from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf

        hf_dir = work_dir / "hf_from_megatron"
        if not (hf_dir / "config.json").is_file():
            convert_megatron_to_hf(source.megatron_ckpt, hf_dir, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    if source.adapter_dir is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise ValueError("--engine hf with an adapter needs the peft package; use --engine megatron "
                             "(applies the adapter with gazal's own DoRA code)") from None
        model = PeftModel.from_pretrained(model, str(source.adapter_dir)).merge_and_unload().eval()
    return HFEngine(model, stop_ids=stop_ids, pad_id=pad_id, max_batch_size=max_batch_size)


# --- vLLM -----------------------------------------------------------------------------------


class VLLMEngine:
    """vllm.LLM on the HF folder (merged weights); needs a GPU and `pip install .[vllm]`."""

    def __init__(self, hf_dir: Path, *, tp: int, stop_ids: list[int], adapter_dir: Path | None = None):
        from gazal_nemo.rl.vllm_engine import _require_vllm

        vllm = _require_vllm()
        self.vllm, self.stop_ids = vllm, stop_ids
        self.llm = vllm.LLM(model=str(hf_dir), tensor_parallel_size=tp, dtype="bfloat16",
                            enable_lora=adapter_dir is not None)
        self.lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("eval_adapter", 1, str(adapter_dir))

    def generate(self, prompts, *, max_new_tokens, temperature, top_k, top_p, seed) -> list[Completion]:
        params = self.vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k if temperature > 0 and top_k > 0 else -1,
                                          top_p=top_p if temperature > 0 else 1.0, seed=seed,
                                          stop_token_ids=self.stop_ids)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        results = self.llm.generate(inputs, params, use_tqdm=False, lora_request=self.lora)
        out = []
        for index, result in enumerate(results):
            tokens = list(result.outputs[0].token_ids)
            out.append(Completion(prompt_index=index, tokens=tokens,
                                  truncated=result.outputs[0].finish_reason == "length"))
        return out


def build_engine(name: str, source: ModelSource, *, tp: int, work_dir: Path, stop_ids: list[int], pad_id: int,
                 max_batch_size: int):
    """The engine `name` on `source`; prints how long loading took (rank 0)."""
    t0 = time.time()
    if name == "megatron":
        engine = build_megatron_engine(source, tp=tp, stop_ids=stop_ids, pad_id=pad_id, max_batch_size=max_batch_size)
    elif name == "hf":
        engine = build_hf_engine(source, work_dir=work_dir, stop_ids=stop_ids, pad_id=pad_id,
                                 max_batch_size=max_batch_size)
    else:
        if source.megatron_ckpt is not None:
            raise ValueError("--engine vllm reads HF weights; export the megatron checkpoint first "
                             "(gazal convert megatron-to-hf) or use --engine megatron")
        engine = VLLMEngine(source.hf_dir, tp=tp, stop_ids=stop_ids, adapter_dir=source.adapter_dir)
    if is_rank0():
        print(f"eval: {name} engine ready in {time.time() - t0:.1f}s", flush=True)
    return engine
