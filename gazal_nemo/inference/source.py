"""What a standalone engine loads: `--model` resolved to weights, architecture and tokenizer.

`gazal eval` (and anything else that generates from a saved model) accepts a HF folder or
hub id, a PEFT adapter folder (on its base), a megatron distributed checkpoint, or a
stage's step checkpoint (exported to HF once, into the work folder). A mistyped path is a
FileNotFoundError naming it, never a hub lookup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


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


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_dtype() -> tuple[str, torch.dtype]:
    """Where a standalone engine runs and in which dtype: bf16 on a GPU, fp32 on the CPU."""
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


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
