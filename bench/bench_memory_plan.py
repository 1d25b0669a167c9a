"""Measured peak memory of our SFT and GRPO steps next to the memory planner's prediction.

It measures nothing itself: it reads the `BENCH_JSON` records that `bench_dora_sft.py`
(variants ours-*) and `bench_grpo_step.py` (variant ours) wrote, rebuilds for each the
recipe those benchmarks ran (the same dataclass defaults `model_shapes.build_ours` uses:
tp 1, distributed optimizer, bf16, AdamW, the record's lengths, batch, adapter and
recompute) and asks `gazal_nemo.training.memory_plan.plan_memory` what that recipe
needs on one GPU. Every row carries the recipe dict, so a planner written or changed
later can be checked against the same measurement on a CPU:

    python bench/bench_memory_plan.py --records runs/gpu_suite/suite.jsonl --out-dir /tmp/plan

Without the planner (not importable) the rows hold the measurements alone. On CPU there
is no device peak (`peak_mem_gib` is null); the rows then only show the plumbing works.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.model_shapes import qwen3_shape  # noqa: E402

BENCH = "memory_plan"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", required=True, help="JSONL of dora_sft / grpo_step records (the suite's)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None,
                        help="GPU memory the plan's verdict is against; default: this device's, else 80")
    parser.add_argument("--out-dir", default="runs/bench")
    return parser.parse_args(argv)


def read_records(path: Path) -> list[dict]:
    """The records of one JSONL file; a torn last line (a killed writer) is skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"--records {path}: no such file")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def measured_steps(records: list[dict]) -> list[dict]:
    """Our SFT (adapter) and GRPO measurements, last one per (bench, variant, shape)."""
    wanted = {}
    for r in records:
        ours_sft = r.get("bench") == "dora_sft" and str(r.get("variant", "")).startswith("ours")
        ours_grpo = r.get("bench") == "grpo_step" and r.get("variant") == "ours"
        if (ours_sft or ours_grpo) and r.get("status") == "ok":
            wanted[(r["bench"], r["variant"], r["shape"])] = r
    return list(wanted.values())


def sft_recipe_dict(r: dict) -> dict:
    """The recipe `bench_dora_sft.py` ran for record `r` (our side)."""
    seq, mbs = r["seq_length"], r["micro_batch_size"]
    return _base_recipe("bench_sft", "sft", r, seq_length=seq, micro_batch_size=mbs, global_batch_size=mbs) | {
        "adapter": {"rank": r["rank"], "alpha": r["alpha"], "dropout": r["dropout"], "use_dora": r["use_dora"],
                    "use_rslora": r["use_rslora"], "dropout_mode": "lowrank"},
        "sft_data": {"sources": [{"path": "random-tokens", "format": "messages"}], "max_length": seq},
    }


def grpo_recipe_dict(r: dict) -> dict:
    """The recipe `bench_grpo_step.py` ran for record `r` (our side, full-parameter)."""
    completions = r["num_prompts"] * r["num_generations"]
    prompt = math.ceil(r["prompt_tokens_mean"])
    recipe = _base_recipe("bench_grpo", "grpo", r, seq_length=prompt + r["max_new_tokens"],
                          micro_batch_size=r["micro_batch_size"], global_batch_size=completions)
    recipe["optim"]["weight_decay"] = 0.0
    recipe["grpo"] = {
        "prompts_per_step": r["num_prompts"],
        "data": {"path": "synthetic-prompts", "max_prompt_length": prompt},
        "sampling": {"temperature": r["temperature"], "top_k": r["top_k"], "top_p": r["top_p"],
                     "num_generations": r["num_generations"], "max_new_tokens": r["max_new_tokens"]},
        "loss": {"beta": 0.0, "normalisation": "bnpo", "mask_truncated": False},
        "rollout": {"engine": "megatron", "megatron": {"max_batch_size": completions}},
    }
    return recipe


def _base_recipe(name: str, stage: str, r: dict, **train) -> dict:
    return {"name": name, "stage": stage, "model": {"hf_path": f"bench shape {r['shape']}"},
            "parallel": {"tp": 1, "pp": 1, "distributed_optimizer": True}, "precision": {"dtype": "bf16"},
            "optim": {"name": "adamw", "weight_decay": 0.1, "warmup_ratio": 0.0, "schedule": "constant",
                      "grad_clip": 1.0},
            "train": {**train, "recompute": r["recompute"]}}


def plan(recipe_dict: dict, shape_name: str, gpu_memory_gib: float) -> dict:
    """The planner's prediction for one recipe, or why there is none."""
    try:
        from gazal_nemo.training.memory_plan import plan_memory
    except ImportError as error:
        return {"planner": f"not importable ({error})", "planned_total_gib": None}
    from gazal_nemo.config_io import from_dict
    from gazal_nemo.recipe import Recipe

    try:
        result = plan_memory(from_dict(Recipe, recipe_dict), qwen3_shape(shape_name), world_size=1,
                             gpu_memory_gib=gpu_memory_gib, use_te=False)
        items = _items_gib(result.items)
        overhead = sum(i["gib"] for i in items.values() if i.get("phase") == "overhead")
        return {"planner": "ok", "planned_total_gib": result.total_bytes / common.GIB,
                "planned_allocated_gib": result.total_bytes / common.GIB - overhead,
                "planned_peak_phase": getattr(result, "peak_phase", None), "planned_items": items,
                "planned_train_terms": getattr(result, "train_terms", None)}
    except Exception as error:  # noqa: BLE001 - a planner bug must not hide the measurement
        return {"planner": f"failed: {type(error).__name__}: {error}"[:500], "planned_total_gib": None}


def _items_gib(items) -> dict:
    """{item name: {gib, phase, note}} from the plan's items (objects or dicts)."""
    out = {}
    for item in items:
        get = item.get if isinstance(item, dict) else lambda key, obj=item: getattr(obj, key, None)
        name, size = get("name"), get("bytes")
        if name is not None and isinstance(size, (int, float)):
            out[str(name)] = {"gib": size / common.GIB, "phase": get("phase"), "note": get("note")}
    return out


def compare(r: dict, gpu_memory_gib: float) -> dict:
    stage = "sft" if r["bench"] == "dora_sft" else "grpo"
    recipe = sft_recipe_dict(r) if stage == "sft" else grpo_recipe_dict(r)
    predicted = plan(recipe, r["shape"], gpu_memory_gib)
    measured = r.get("peak_mem_gib")
    return {"stage": stage, "measured_bench": r["bench"], "measured_variant": r["variant"],
            "measured_device": r.get("device_name"), "measured_date_utc": r.get("date_utc"),
            "measured_peak_gib": measured, "measured_peak_reserved_gib": r.get("peak_reserved_gib"), **predicted,
            "measured_over_planned_allocated": common.ratio(measured, predicted.get("planned_allocated_gib")),
            "gpu_memory_gib": gpu_memory_gib, "recipe": recipe}


def default_gpu_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / common.GIB
    return 80.0


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    steps = measured_steps(read_records(Path(args.records)))
    gpu_memory = args.gpu_memory_gib or default_gpu_memory_gib()
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reporter = common.Reporter(BENCH, args.out_dir, device)
    if not steps:
        records = [reporter.emit({"variant": "ours", "shape": "none", "status": "failed",
                                  "error": f"{args.records} holds no ok ours dora_sft / grpo_step record"})]
    else:
        records = [reporter.emit({"variant": r["variant"], "shape": r["shape"], "status": "ok",
                                  **compare(r, gpu_memory)}) for r in steps]
    print(report(reporter, records))
    return records


def report(reporter, records: list[dict]) -> str:
    rows = [[r.get("stage"), r.get("shape"), r.get("measured_variant"), r.get("measured_device"),
             r.get("measured_peak_gib"), r.get("planned_allocated_gib"), r.get("measured_over_planned_allocated"),
             r.get("measured_peak_reserved_gib"), r.get("planned_total_gib"), r.get("planner", r.get("error"))]
            for r in records]
    text = ("## Peak memory: measured vs the memory planner (one GPU, tp 1)\n\n"
            "Measured: torch.cuda.max_memory_allocated (tensors) and max_memory_reserved (the caching "
            "allocator's pool) over the step. Planned allocated: the plan without its overhead items "
            "(allocator headroom, CUDA context), the counterpart of the allocated peak; planned total "
            "adds them.\n\n"
            + common.markdown_table(["stage", "shape", "variant", "measured on", "measured allocated GiB",
                                     "planned allocated GiB", "measured/planned", "measured reserved GiB",
                                     "planned total GiB", "planner"], rows))
    path = reporter.write_markdown(text)
    return text + f"\n(written to {path} and {reporter.jsonl})\n"


if __name__ == "__main__":
    main()
