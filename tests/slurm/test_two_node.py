"""`sbatch --nodes=2` of both scripts on a real two-node Slurm on this machine.

scripts/slurm_two_node.sh starts slurmctld and two slurmd, each in its own network
namespace with its own address, NodeName and hostname (gz-node1, gz-node2) on a bridge, with
its own slurm.conf and ports, so the one-node CI Slurm the other tests use keeps running.
The jobs use the scripts' own headers plus `--nodes=2`; ranks on gz-node2 reach the TCP store
and gloo peers on gz-node1 over the bridge. Each rank's placement line must name its node:
the first half of the ranks on gz-node1, the rest on gz-node2. The fixture stops every
daemon and removes the namespaces and the bridge, also when a test fails.

Needs root (namespaces, a bridge, daemons) and Slurm installed; skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from slurm_jobs import (
    GRPO_OVERRIDES,
    GRPO_SCRIPT,
    REPO,
    SFT_SCRIPT,
    assert_complete_checkpoint,
    assert_one_row_per_step,
    assert_ranks_placed,
    metric_rows,
    submit,
)

HARNESS = REPO / "scripts" / "slurm_two_node.sh"
NODES = ("gz-node1", "gz-node2")
JOB_TIMEOUT_S = 600


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, a bridge, Slurm daemons)"
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged", "ip", "nsenter", "unshare")
               if shutil.which(tool) is None]
    return f"not installed: {', '.join(missing)} (scripts/ci_slurm_setup.sh installs Slurm)" if missing else None


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


@pytest.fixture(scope="module")
def two_node_slurm_conf() -> str:
    """SLURM_CONF of the running two-node cluster; stopped and removed after the module."""
    try:
        started = subprocess.run(["bash", str(HARNESS), "start"], capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"two-node Slurm did not start:\n{started.stdout}\n{started.stderr}"
        conf = re.search(r"^SLURM_CONF=(\S+)$", started.stdout, re.M)
        assert conf, started.stdout
        yield conf[1]
    finally:
        stopped = subprocess.run(["bash", str(HARNESS), "stop"], capture_output=True, text=True, timeout=180)
        assert stopped.returncode == 0, f"two-node Slurm did not stop cleanly:\n{stopped.stdout}\n{stopped.stderr}"


def test_harness_gives_two_idle_nodes_with_eight_gpus_each(two_node_slurm_conf):
    env = {**os.environ, "SLURM_CONF": two_node_slurm_conf}
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], capture_output=True, text=True, env=env,
                           timeout=30).stdout.split("\n")
    assert sorted(line.split() for line in nodes if line) == [[node, "idle", "gpu:8"] for node in NODES]


def _assert_ranks_on_both_nodes(log: str, world_size: int) -> None:
    assert_ranks_placed(log, world_size, hosts=set(NODES))
    per_node = world_size // 2
    for rank in range(world_size):
        node, local_rank = NODES[rank // per_node], rank % per_node
        assert re.search(rf"^ *{rank}: rank {rank}/{world_size} on {node} local_rank {local_rank}$", log, re.M), \
            f"rank {rank} not on {node} as local rank {local_rank}:\n{log[-4000:]}"


def test_sft_on_two_nodes(two_node_slurm_conf, tiny_run_inputs, tmp_path):
    """4 ranks (2 per node, dp 4): global batch 4 as 1 sequence per rank."""
    out = tmp_path / "run"
    job = submit(SFT_SCRIPT, tmp_path, sbatch_args=("--nodes=2",), slurm_conf=two_node_slurm_conf,
                 RECIPE="recipes/tiny_cpu_sft.yaml", HF_MODEL_DIR=str(tiny_run_inputs["model"]),
                 SFT_DATA_SYNTHETIC=str(tiny_run_inputs["sft"]), OUTPUT_DIR=str(out),
                 OVERRIDES="train.max_steps=2 train.micro_batch_size=1 export_dir=null")
    code, log = job.wait(JOB_TIMEOUT_S), job.log()
    assert code == 0, log[-6000:]
    assert "2 node(s) x 2 tasks, world size 4" in log and "master gz-node1:" in log, log[-4000:]
    _assert_ranks_on_both_nodes(log, 4)
    assert_one_row_per_step(metric_rows(out / "logs"), 2)
    assert_complete_checkpoint(out / "checkpoints", step=2, world_size=4)


def test_grpo_on_two_nodes(two_node_slurm_conf, tiny_run_inputs, tmp_path):
    """16 ranks (8 per node, dp 16)."""
    out = tmp_path / "run"
    job = submit(GRPO_SCRIPT, tmp_path, sbatch_args=("--nodes=2",), slurm_conf=two_node_slurm_conf,
                 RECIPE="recipes/tiny_cpu_grpo.yaml", HF_MODEL_DIR=str(tiny_run_inputs["model"]),
                 GRPO_DATA=str(tiny_run_inputs["grpo"]), OUTPUT_DIR=str(out), OVERRIDES=GRPO_OVERRIDES)
    code, log = job.wait(JOB_TIMEOUT_S), job.log()
    assert code == 0, log[-6000:]
    assert "2 node(s) x 8 tasks, world size 16" in log, log[-4000:]
    _assert_ranks_on_both_nodes(log, 16)
    assert_one_row_per_step(metric_rows(out / "logs"), 1)
    assert_complete_checkpoint(out / "checkpoints", step=1, world_size=16)


def test_async_grpo_generates_on_one_node_and_trains_on_the_other(two_node_slurm_conf, tiny_run_inputs, tmp_path):
    """slurm/grpo_async_2x8xh100.sh with one task per node: rank 0 trains on gz-node1, rank 1 runs
    vLLM on gz-node2; weights cross the bridge to it and scored batches come back every step."""
    out = tmp_path / "run"
    job = submit("slurm/grpo_async_2x8xh100.sh", tmp_path, sbatch_args=("--nodes=2", "--ntasks-per-node=1"),
                 slurm_conf=two_node_slurm_conf, RECIPE="recipes/tiny_cpu_grpo.yaml",
                 HF_MODEL_DIR=str(tiny_run_inputs["model"]), GRPO_DATA=str(tiny_run_inputs["grpo"]),
                 OUTPUT_DIR=str(out), GENERATOR_RANKS="1", GENERATOR_TP="1",
                 OVERRIDES="train.max_steps=3 grpo.prompts_per_step=4 train.global_batch_size=16 "
                           "train.micro_batch_size=8 grpo.sampling.max_new_tokens=8 export_dir=null")
    code, log = job.wait(JOB_TIMEOUT_S), job.log()
    assert code == 0, log[-6000:]
    _assert_ranks_on_both_nodes(log, 2)
    rows = metric_rows(out / "logs")
    assert_one_row_per_step(rows, 3)
    assert all(sum(v for k, v in r.items() if k.startswith("samples/staleness_")) == 16 for r in rows)
    assert any("push/max_logprob_diff" in r for r in rows)  # the generator's push gate reported
    assert_complete_checkpoint(out / "checkpoints", step=3, world_size=1)
