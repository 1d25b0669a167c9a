"""SIGUSR1 / SIGTERM stop a run at a step boundary with a checkpoint and exit code 75.

1. The ranks agree: a signal seen by one rank of a real 2-process gloo group stops both.
2. End to end, as Slurm runs it (one `python -m gazal_nemo.cli` per rank, rendezvous from
   the environment): SIGUSR1 to rank 1 alone mid-run -> both ranks save the same step and
   exit 75; the rerun resumes there and ends with the same per-step losses as a run that
   was never interrupted, one metrics row per step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gazal_nemo.testing.multiproc import free_port, run_distributed
from gazal_nemo.training.preemption import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
TOTAL_STEPS = 10


def _agree_after_signal_on_rank_1(signum: int) -> list:
    import torch.distributed as dist

    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.training import preemption

    init_parallel()
    preemption.install_stop_handlers()
    try:
        before = preemption.agreed_stop_signal()
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signum)
        dist.barrier()
        after = preemption.agreed_stop_signal()
        return [before, after, preemption.stop_requested_locally()]
    finally:
        preemption.restore_default_handlers()


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_on_one_rank_stops_every_rank(signum):
    results = run_distributed(_agree_after_signal_on_rank_1, 2, signum)
    name = signal.Signals(signum).name
    assert results[0] == [None, name, False]  # rank 0 never saw it, but agrees
    assert results[1] == [None, name, True]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_hf_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), tiny_hf_dir)["sft"]


def _start_ranks(out: Path, hf_dir, data, port: int) -> list[subprocess.Popen]:
    command = [sys.executable, "-m", "gazal_nemo.cli", "sft", "--recipe", "recipes/tiny_cpu_sft.yaml",
               f"model.hf_path={hf_dir}", f"sft_data.sources.0.path={data}", f"train.max_steps={TOTAL_STEPS}",
               f"checkpoint.dir={out / 'ckpt'}", "checkpoint.save_every=0", f"logging.dir={out / 'logs'}",
               "export_dir=null"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=300), p.stdout.read()) for p in procs]


def _rows(out: Path) -> list[dict]:
    path = out / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_sigusr1_mid_run_saves_exits_75_and_the_rerun_matches_an_uninterrupted_run(tmp_path, tiny_hf_dir, sft_data):
    from gazal_nemo.training.checkpoint import latest_checkpoint

    straight = tmp_path / "straight"
    done = _finish(_start_ranks(straight, tiny_hf_dir, sft_data, free_port()))
    assert all(code == 0 for code, _ in done), done[0][1][-3000:]

    interrupted = tmp_path / "interrupted"
    procs = _start_ranks(interrupted, tiny_hf_dir, sft_data, free_port())
    deadline = time.time() + 240
    while len(_rows(interrupted)) < 3 and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.05)
    assert len(_rows(interrupted)) >= 3, "the run did not reach step 3"
    procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: rank 0 must learn it from the all-reduce
    (code0, log0), (code1, log1) = _finish(procs)
    assert (code0, code1) == (REQUEUE_EXIT_CODE, REQUEUE_EXIT_CODE), log0[-3000:] + log1[-3000:]
    stopped = len(_rows(interrupted))
    assert 3 <= stopped < TOTAL_STEPS, f"stopped after {stopped} steps; signal came too late to test anything"
    assert f"gazal: stopping after step {stopped}/{TOTAL_STEPS} on SIGUSR1" in log0
    latest = latest_checkpoint(interrupted / "ckpt")
    assert latest is not None and json.loads((latest / "trainer_state.json").read_text())["step"] == stopped

    resumed = _finish(_start_ranks(interrupted, tiny_hf_dir, sft_data, free_port()))
    assert all(code == 0 for code, _ in resumed), resumed[0][1][-3000:]
    assert f"resumed from {latest}" in resumed[0][1]
    rows, reference = _rows(interrupted), _rows(straight)
    assert [r["step"] for r in rows] == list(range(1, TOTAL_STEPS + 1))
    for ours, theirs in zip(rows, reference):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7), (ours["step"], ours, theirs)
