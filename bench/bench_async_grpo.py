"""Asynchronous GRPO against colocated: steps per hour on a rollout-bound CPU shape, same run.

Three `gazal grpo` runs of the same random-init model, data, rewards and steps, all with the
vLLM engine:

  colocated   one process on both cores: vLLM generates inside the trainer, between steps
  async k=1   the trainer pinned to core 0, one vLLM generator rank pinned to core 1
  async k=2   the same with max_staleness 2

The same two cores each time, so the comparison is what overlapping buys on fixed hardware
(the GPU layouts give the generators GPUs of their own instead). The shape is chosen so that
generation is most of a colocated step (reported: the rollout's share of the colocated step,
from metrics.jsonl's data_time_s / step_time_s). Steps per hour come from the median step
time after the first `--skip` steps (engine start, first push). Ranks are started by hand
(RANK/WORLD_SIZE/MASTER_*; the stages accept any launcher) so each can get its own core.

    python bench/bench_async_grpo.py                     # 12 steps each, ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402

BENCH = "async_grpo"
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--out-dir", default="runs/bench")
    return parser.parse_args(argv)


def make_inputs(folder: Path) -> tuple[Path, Path]:
    """A small random Qwen3 (generation-heavy next to its training pass) and the demo's MCQ data."""
    from gazal_nemo.commands.demo_data import write_demo_data
    from gazal_nemo.models.tiny import make_tiny_qwen3

    model = make_tiny_qwen3(folder / "model", seed=0, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=32, init_std=0.05)
    data = write_demo_data(folder / "data", model, num_sft=4, num_grpo=256)
    return model, data["grpo"]


def overrides(args, model: Path, data: Path, run: Path) -> list[str]:
    per_step = args.prompts_per_step * 4
    return [f"model.hf_path={model}", f"grpo.data.path={data}", f"checkpoint.dir={run / 'ckpt'}",
            f"logging.dir={run / 'logs'}", "export_dir=null", "grpo.rollout.engine=vllm",
            f"grpo.prompts_per_step={args.prompts_per_step}", f"train.global_batch_size={per_step}",
            f"train.micro_batch_size={per_step}", f"grpo.sampling.max_new_tokens={args.max_new_tokens}",
            f"train.max_steps={args.steps}", "checkpoint.save_every=0", "grpo.guard.enabled=false",
            "grpo.loss.tis_cap=2", "grpo.log_rollouts_every=0"]


def launch(ranks: list[tuple[str, list[str]]], *, port: int) -> None:
    """Start one process per (cpu list, extra overrides) as ranks 0..n-1 of one job; wait for all."""
    procs = []
    for rank, (cpus, command) in enumerate(ranks):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(ranks)), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(len(cpus.split(",")))}
        procs.append(subprocess.Popen(["taskset", "-c", cpus, *command], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(e[-2000:] for e in errors))


def measure(name: str, run: Path, args) -> dict:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[args.skip:]
    step = statistics.median(r["step_time_s"] for r in steady)
    rollout = statistics.median(r["data_time_s"] for r in steady)
    staleness = {k: sum(r.get(k, 0) for r in steady) for r in steady for k in r if k.startswith("samples/staleness")}
    return {"variant": name, "steps": len(rows), "step_time_median_s": step, "rollout_wait_median_s": rollout,
            "rollout_share": rollout / step, "steps_per_hour": 3600 / step, "staleness": staleness,
            "accuracy_last": rows[-1].get("reward/accuracy")}


def main(argv=None) -> int:
    from gazal_nemo.parallel import free_port

    args = parse_args(argv)
    reporter = common.Reporter(BENCH, args.out_dir, torch.device("cpu"))
    gazal = [sys.executable, "-m", "gazal_nemo.cli", "grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_inputs(Path(tmp))
        variants = [("colocated (2 cores)", [("0,1", [])]),
                    ("async k=1 (trainer core 0, generator core 1)", [("0", ["k=1"]), ("1", ["k=1"])]),
                    ("async k=2 (trainer core 0, generator core 1)", [("0", ["k=2"]), ("1", ["k=2"])])]
        for number, (name, ranks) in enumerate(variants):
            run = Path(tmp) / f"run{number}"
            jobs = []
            for cpus, extra in ranks:
                command = [*gazal, *overrides(args, model, data, run)]
                if extra:
                    k = extra[0].split("=")[1]
                    command += ["grpo.rollout.mode=async", "grpo.rollout.generator_ranks=1",
                                f"grpo.rollout.max_staleness={k}", "grpo.sampling.train_logprobs=filtered"]
                jobs.append((cpus, command))
            launch(jobs, port=free_port())
            results.append(measure(name, run, args))
            print(json.dumps(results[-1]), flush=True)
    colocated = results[0]["steps_per_hour"]
    for result in results:
        result["speedup_over_colocated"] = result["steps_per_hour"] / colocated
    reporter.emit({"steps": args.steps, "max_new_tokens": args.max_new_tokens,
                   "prompts_per_step": args.prompts_per_step, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
