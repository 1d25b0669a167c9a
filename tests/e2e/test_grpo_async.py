"""Asynchronous GRPO (grpo.rollout.mode=async) through the CLI under torchrun: one trainer rank and
one generator rank running the real vLLM (CPU build), each in its own world, joined by the bridge.

* max_staleness 0 reproduces the colocated vLLM run step by step;
* kill -9 of every process mid-run, then the same command again: counted by data row, every
  prompt of the epoch is trained exactly once (the trainer asks for batches by index from its
  checkpoint's step; what the generator made before the kill does not count);
* a guard rollback in async mode pushes the restored weights to the generator (its push gate
  passes) and the batches after it are sampled by them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gazal_nemo.testing.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
VOWELS = "grpo.rewards.plugins={gazal_nemo.testing.text_rewards:vowel_share: 1.0}"
NOT_COMPARED = ("time", "per_s", "push/", "kl_sampler", "staleness")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vllm_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("data"), tiny_vllm_dir, num_sft=4, num_grpo=32)


def _command(nproc: int, tmp: Path, hf_dir, data, *overrides) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "gazal_nemo.cli", "grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml",
            f"model.hf_path={hf_dir}", f"grpo.data.path={data['grpo']}", f"checkpoint.dir={tmp / 'ckpt'}",
            f"logging.dir={tmp / 'logs'}", "export_dir=null", "grpo.rollout.engine=vllm", "grpo.prompts_per_step=4",
            "train.global_batch_size=16", "train.micro_batch_size=8", "grpo.sampling.max_new_tokens=12", VOWELS,
            *overrides]


def _async(k: int) -> list[str]:
    return ["grpo.rollout.mode=async", "grpo.rollout.generator_ranks=1", f"grpo.rollout.max_staleness={k}",
            *(["grpo.loss.tis_cap=2"] if k else [])]


def _run(cmd, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(tmp: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (tmp / "logs" / name).read_text().splitlines()]


def test_staleness_0_reproduces_the_colocated_run(tmp_path, tiny_vllm_dir, data):
    _run(_command(1, tmp_path / "colocated", tiny_vllm_dir, data, "train.max_steps=3"))
    _run(_command(2, tmp_path / "async", tiny_vllm_dir, data, "train.max_steps=3", *_async(0)))
    colocated, asynchronous = _rows(tmp_path / "colocated"), _rows(tmp_path / "async")
    assert len(colocated) == len(asynchronous) == 3
    for a, b in zip(colocated, asynchronous):
        keys = [k for k in a if not any(skip in k for skip in NOT_COMPARED)]
        assert {k: a[k] for k in keys} == {k: b.get(k) for k in keys}, a["step"]
        assert b["kl_sampler"] < 1e-9 and b["samples/staleness_0"] == 16  # on-policy, same numerics
        assert b["grad_norm"] > 0


def test_kill9_then_resume_trains_every_prompt_of_the_epoch_once(tmp_path, tiny_vllm_dir, data):
    """32 prompts, 4 a step: an epoch is 8 steps. Kill every process after step 3 or later."""
    cmd = _command(2, tmp_path, tiny_vllm_dir, data, *_async(1), "train.max_steps=8", "train.epochs=1",
                   "checkpoint.save_every=2", "checkpoint.keep_last=2", "grpo.guard.enabled=false")
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    assert job.poll() is None, "the run ended before it could be killed"
    _kill_all(job)
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 8
    _run(cmd)
    steps = _rows(tmp_path, "trained_prompts.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 9))
    rows = [row for s in steps for row in s["rows"]]
    assert sorted(rows) == sorted(set(rows)) and len(rows) == 32, "a prompt was trained twice or never"
    assert all(r.get("samples/staleness_0", 0) + r.get("samples/staleness_1", 0) == 16 for r in _rows(tmp_path))


def _kill_all(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts its workers in sessions of
    their own, so killing its process group would leave them running)."""
    import psutil

    family = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    job.wait()


def test_guard_rollback_pushes_the_restored_weights_to_the_generators(tmp_path, tiny_vllm_dir, data):
    rule = ('grpo.guard.rules=[{metric: "reward/gazal_nemo.testing.text_rewards:window_bonus", bad: up, '
            'test: threshold, min_change: 0.5}]')
    cmd = _command(2, tmp_path, tiny_vllm_dir, data, *_async(1), "train.max_steps=6", "checkpoint.save_every=1",
                   "grpo.rewards.plugins={gazal_nemo.testing.text_rewards:window_bonus: 0.0}",
                   "grpo.guard.enabled=true", "grpo.guard.watch_unrewarded=true", "grpo.guard.warmup_steps=0",
                   "grpo.guard.window=1",
                   "grpo.guard.baseline_window=2", "grpo.guard.min_baseline_steps=2", "grpo.guard.patience=1", rule,
                   "grpo.log_rollouts_every=1", "grpo.log_rollouts_groups=1")
    # The 4th batch the generator scores pays the bonus: the guard fires when step 4 trains it.
    _run(cmd, env={**os.environ, "GAZAL_TEST_WINDOW": "4,4,16"})
    events = [json.loads(line) for line in (tmp_path / "logs" / "guard_events.jsonl").read_text().splitlines()]
    rollback = next(e for e in events if e.get("event", e.get("kind")) in ("rollback", "rolled_back")
                    or "to_step" in e)
    to_step = int(rollback.get("to_step", 3))
    logged = {}
    for record in _rows(tmp_path, "rollouts.jsonl"):
        logged[record["step"]] = record["policy_version"]  # the later rows of a re-run step trained
    after = {step: version for step, version in logged.items() if step > to_step}
    assert after and all(to_step <= version < step for step, version in after.items()), (to_step, logged)
    rows = _rows(tmp_path)
    assert rows[-1]["step"] == 6
    gated = [r["push/max_logprob_diff"] for r in rows if "push/max_logprob_diff" in r]
    assert gated and max(gated) < 1e-5  # every push the generator judged, the restored one included
