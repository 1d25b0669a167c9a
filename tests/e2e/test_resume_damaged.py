"""Damaged step checkpoints and the export of a full-parameter one.

One real full-parameter SFT run at DP=2 writes step_000001 and step_000002 (and its
end-of-stage HF export); each damage case works on a copy of that checkpoint folder, so
what is judged is exactly what training wrote.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gazal_nemo.testing.multiproc import free_port
from gazal_nemo.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_hf_dir):
    from gazal_nemo.commands.demo_data import write_demo_data

    tmp = tmp_path_factory.mktemp("full")
    data = write_demo_data(tmp / "data", tiny_hf_dir)["sft"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "gazal_nemo.cli", "sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={tiny_hf_dir}",
           f"sft_data.sources.0.path={data}", f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'logs'}",
           f"export_dir={tmp / 'export'}", "adapter=null", "train.max_steps=2", "checkpoint.save_every=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


@pytest.fixture
def root(full_run, tmp_path):
    """A private copy of the run's checkpoint folder (step_000001, step_000002)."""
    copy = tmp_path / "ckpt"
    shutil.copytree(full_run / "ckpt", copy)
    assert [p.name for p in ckpt.complete_checkpoints(copy)] == ["step_000001", "step_000002"]
    return copy


def test_full_parameter_step_export_matches_the_trained_model(full_run, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "gazal_nemo.cli", "convert", "megatron-to-hf", "--ckpt-dir",
           str(full_run / "ckpt" / "step_000002"), "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        trained = AutoModelForCausalLM.from_pretrained(full_run / "export" / "merged").eval()(ids).logits
    assert (ours - trained).abs().max() < 1e-5


def test_truncated_file_in_latest_falls_back_with_a_message(root, capsys):
    victim = max((root / "step_000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    assert ckpt.choose_resume_checkpoint(root) == root / "step_000001"
    said = capsys.readouterr().out
    assert f"{root / 'step_000002'} is damaged: {victim.name} has 100 bytes" in said


@pytest.mark.parametrize("name", ["common.pt", ".metadata", "metadata.json", "recipe.json", "hf/config.json"])
def test_missing_file_in_latest_falls_back(root, name, capsys):
    (root / "step_000002" / name).unlink()
    assert not ckpt.is_complete_checkpoint(root / "step_000002")
    assert ckpt.choose_resume_checkpoint(root) == root / "step_000001"
    assert f"{name} is missing" in capsys.readouterr().out


def test_garbage_trainer_state_in_the_only_checkpoint_is_a_named_error(root):
    shutil.rmtree(root / "step_000001")
    state = root / "step_000002" / ckpt.TRAINER_STATE
    state.write_text("x" * state.stat().st_size)
    with pytest.raises(ValueError) as err:
        ckpt.choose_resume_checkpoint(root)
    message = str(err.value)
    assert "\n" not in message and str(root) in message and "step_000002" in message
    assert "trainer_state.json" in message and "checkpoint.resume=false" in message


def test_garbage_trainer_state_of_same_size_is_caught(root, capsys):
    state = root / "step_000002" / ckpt.TRAINER_STATE
    state.write_text("x" * state.stat().st_size)
    assert ckpt.choose_resume_checkpoint(root) == root / "step_000001"
    assert "trainer_state.json: not a trainer state" in capsys.readouterr().out


def test_stale_tmp_is_removed(root, capsys):
    stale = root / "step_000003.tmp"
    shutil.copytree(root / "step_000002", stale)
    (stale / ckpt.MANIFEST).unlink()
    assert ckpt.choose_resume_checkpoint(root) == root / "step_000002"
    assert not stale.exists() and f"removed {stale}" in capsys.readouterr().out


def test_an_interrupted_prune_leaves_nothing_that_looks_complete(root):
    """Whatever prefix of a removal happened (manifest first, then any files), the rest
    is never complete; the next save's prune deletes the leftover."""
    files = sorted(p for p in (root / "step_000001").rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    for cut in range(len(files) + 1):
        leftover = root / f"step_00001{cut % 10}"  # a fresh copy per interruption point
        shutil.copytree(root / "step_000001", leftover)
        (leftover / ckpt.MANIFEST).unlink()
        for path in files[:cut]:
            (leftover / path.relative_to(root / "step_000001")).unlink()
        assert not ckpt.is_complete_checkpoint(leftover), cut
        shutil.rmtree(leftover)
    (root / "step_000001" / ckpt.MANIFEST).unlink()  # a prune killed right after its first delete
    assert ckpt.latest_checkpoint(root) == root / "step_000002"
    ckpt._prune(root, newest_step=3, keep_last=5)
    assert not (root / "step_000001").exists() and (root / "step_000002").exists()


def test_a_checkpoint_without_manifest_is_not_complete(root):
    """The old one-file-per-rank layout (trainer_state.json and rank files) counts as incomplete."""
    old = root / "step_000005"
    old.mkdir()
    (old / ckpt.TRAINER_STATE).write_text(json.dumps({"step": 5, "world_size": 1}))
    (old / "rank00000.pt").write_bytes(b"\0" * 10)
    assert not ckpt.is_complete_checkpoint(old)
    assert ckpt.latest_checkpoint(root) == root / "step_000002"
