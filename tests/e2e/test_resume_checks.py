"""One SFT run (DoRA adapter, dropout 0) carried through everything a cluster does to it, each
part checked against an uninterrupted DP=1 run of the same recipe:

  A  DP=2, killed by SIGKILL (every rank) while writing the step-4 checkpoint
  B  DP=1 with another learning rate in the same folder: refused, both values named
  C  DP=1 resumes from step 2 (the last complete checkpoint), stops at 4      (DP 2 -> 1)
     (exit 75: the run is not finished, so an afterok dependency must not start)
  D  DP=2 resumes from step 4 and finishes the 6 steps                       (DP 1 -> 2)
  E  DP=1 after the step-6 checkpoint was truncated: falls back to step 4 and, with
     checkpoint.allow_changes, runs on to step 8 at a doubled learning rate, then exports

Tolerances: losses of resumed steps equal the reference to rel 1e-5 (fp32 on CPU; the DP
change only reorders the gradient all-reduce, observed differences are ~1e-7); the
exports' logits agree to 1e-5.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gazal_nemo.testing.multiproc import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
LR = 3.0e-3  # recipes/tiny_cpu_sft.yaml


def _command(nproc: int, tmp: Path, hf_dir, data, overrides) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "gazal_nemo.cli", "sft", "--recipe", "recipes/tiny_cpu_sft.yaml",
            f"model.hf_path={hf_dir}", f"sft_data.sources.0.path={data}", f"checkpoint.dir={tmp / 'ckpt'}",
            f"logging.dir={tmp / 'logs'}", "export_dir=null", "train.max_steps=6", "checkpoint.save_every=2",
            "adapter.dropout=0.0", *overrides]


def _run(nproc, tmp, hf_dir, data, *overrides, expect_rc=0):
    proc = subprocess.run(_command(nproc, tmp, hf_dir, data, overrides), capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "logs" / "metrics.jsonl").read_text().splitlines()]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts each rank in a session of its own, so a
    process-group kill would miss them)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_during_save(tmp, hf_dir, data, step: int) -> None:
    """Start a DP=2 run whose step-`step` save pauses before its manifest, and SIGKILL every
    process of it (launcher and both ranks) at that point."""
    env = dict(os.environ, GAZAL_TEST_CHECKPOINT_PAUSE=f"{step}:120")
    proc = subprocess.Popen(_command(2, tmp, hf_dir, data, []), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT, env=env, start_new_session=True)
    seen, deadline, victims = [], time.time() + 400, []
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"before the manifest of step {step}" in line or time.time() > deadline:
                break
    finally:
        victims = [proc.pid, *_descendants(proc.pid)]
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)
    assert any(f"manifest of step {step}" in line for line in seen), "".join(seen[-40:])
    assert len(victims) >= 3, victims  # torchrun and two ranks
    time.sleep(1)
    assert not [pid for pid in victims if _alive(pid)], "a rank survived the kill"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    tmp = tmp_path_factory.mktemp("resume")
    data = write_demo_data(tmp / "data", tiny_hf_dir)["sft"]
    out = {"reference": tmp / "reference", "run": tmp / "run", "data": data}
    _run(1, out["reference"], tiny_hf_dir, data)
    return out


def test_kill9_reshard_refuse_fallback_allow(runs, tiny_hf_dir):
    data, run = runs["data"], runs["run"]
    reference = _rows(runs["reference"])
    assert [r["step"] for r in reference] == [1, 2, 3, 4, 5, 6]
    ckpt = run / "ckpt"

    # A: kill -9 of all ranks in the middle of the step-4 write
    _kill_during_save(run, tiny_hf_dir, data, 4)
    assert (ckpt / "step_000004.tmp").is_dir() and not (ckpt / "step_000004").exists()
    from gazal_nemo.training.checkpoint import complete_checkpoints

    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_000002"]

    # B: another learning rate in the same folder is refused before training, naming both values
    refused = _run(1, run, tiny_hf_dir, data, "optim.lr=1e-3", expect_rc=2)
    assert "Traceback" not in refused.stderr
    assert "optim.lr: 0.003 -> 0.001" in refused.stderr and "checkpoint.allow_changes" in refused.stderr
    assert not (ckpt / "step_000004.tmp").exists(), "the stale .tmp of the killed write must be removed"

    # C: DP=1 continues from step 2; D: DP=2 continues from step 4
    resumed = _run(1, run, tiny_hf_dir, data, "train.stop_at_step=4", expect_rc=75)  # not finished: no 0
    assert "resumed from" in resumed.stdout and "step_000002" in resumed.stdout
    assert "stopped at train.stop_at_step=4 (step 4 of 6" in resumed.stdout
    _run(2, run, tiny_hf_dir, data)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], "metrics.jsonl must keep one row per step"
    for ours, ref in zip(rows, reference):
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5), (ours["step"], ours["loss"], ref["loss"])
        assert ours["lr"] == pytest.approx(ref["lr"], rel=1e-9)

    # E: a truncated newest checkpoint falls back to step 4; allowed changes take effect
    victim = max((ckpt / "step_000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    final = _run(1, run, tiny_hf_dir, data, "optim.lr=6e-3", "train.max_steps=8",
                 "checkpoint.allow_changes=[optim.lr,train.max_steps]", f"export_dir={run / 'export'}")
    assert f"checkpoint {ckpt / 'step_000006'} is damaged: {victim.name} has" in final.stdout, final.stdout[-2000:]
    assert f"resumed from {ckpt / 'step_000004'}" in final.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows[:4]] == pytest.approx([r["loss"] for r in reference[:4]], rel=1e-5)
    for row in rows[4:]:  # megatron's cosine by hand: 1 warmup step, decay over 8 steps, min_lr 0
        expected = 6e-3 * 0.5 * (1 + math.cos(math.pi * (row["step"] - 1) / 7))
        assert row["lr"] == pytest.approx(expected, rel=1e-9), row


def test_step_export_of_adapter_run_matches_the_trained_model(runs, tmp_path, tiny_hf_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = runs["run"]
    if not (run / "export" / "merged").is_dir():
        pytest.skip("needs the run of test_kill9_reshard_refuse_fallback_allow")
    cmd = [sys.executable, "-m", "gazal_nemo.cli", "convert", "megatron-to-hf", "--ckpt-dir", str(run / "ckpt"),
           "--out", str(tmp_path / "hf"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step_000008" in proc.stdout  # the root means its newest complete checkpoint
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
        trained = AutoModelForCausalLM.from_pretrained(run / "export" / "merged").eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
        peft = PeftModel.from_pretrained(base, run / "export" / "adapter").eval()(ids).logits
    assert (ours - trained).abs().max() < 1e-5
    assert (ours - peft).abs().max() < 1e-4
