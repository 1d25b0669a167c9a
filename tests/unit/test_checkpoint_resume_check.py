"""What a resume compares (training/resume_check.py) and how metrics.jsonl is kept to one row
per step (training/metrics.py); the end-to-end runs are in tests/e2e/test_resume_checks.py."""

import json

import pytest

from gazal_nemo.config_io import to_dict
from gazal_nemo.recipe import load_recipe
from gazal_nemo.training.metrics import MetricsLogger, truncate_metrics_jsonl
from gazal_nemo.training.resume_check import check_resume_recipe, recipe_changes

RECIPE = "recipes/tiny_cpu_sft.yaml"


def _recipe(*overrides) -> dict:
    return to_dict(load_recipe(RECIPE, ["model.hf_path=/models/base", *overrides]))


def test_every_run_altering_difference_is_named_with_both_values():
    saved = _recipe()
    new = _recipe("optim.lr=1e-3", "train.seed=7", "sft_data.sources.0.path=other.jsonl", "adapter.rank=4")
    with pytest.raises(ValueError) as err:
        check_resume_recipe(saved, new, where="ckpt/step_000010")
    message = str(err.value)
    assert "\n" not in message and message.startswith("ckpt/step_000010: ")
    for part in ("optim.lr: 0.003 -> 0.001", "train.seed: 3407 -> 7", "adapter.rank: 8 -> 4",
                 "sft_data.sources: "):
        assert part in message, (part, message)
    assert "checkpoint.allow_changes=[adapter.rank,optim.lr,sft_data.sources,train.seed]" in message


@pytest.mark.parametrize("override", [
    "logging.dir=elsewhere", "logging.log_every=5", "checkpoint.save_every=1", "checkpoint.keep_last=9",
    "checkpoint.dir=other", "train.stop_at_step=3", "export_dir=null", "parallel.tp=2", "parallel.pp=2",
    "name=renamed",
])
def test_keys_that_do_not_alter_the_run_never_block(override):
    check_resume_recipe(_recipe(), _recipe(override), where="x")


@pytest.mark.parametrize("override", [
    "optim.name=adamw", "optim.schedule=constant", "train.global_batch_size=8", "train.max_steps=3",
    "train.micro_batch_size=1", "precision.dtype=bf16", "parallel.distributed_optimizer=false",
    "model.hf_path=/models/other", "adapter=null", "sft_data.seed=1",
])
def test_keys_that_alter_the_run_block(override):
    key = override.split("=")[0]
    changes = recipe_changes(_recipe(), _recipe(override))
    assert changes and all(k == key or k.startswith(key + ".") for k, _, _ in changes), changes


def test_allow_changes_takes_keys_and_prefixes_from_the_cli():
    saved = _recipe()
    new = _recipe("optim.lr=1e-3", "optim.beta2=0.99", "train.seed=1", "checkpoint.allow_changes=[optim,train.seed]")
    assert new["checkpoint"]["allow_changes"] == ["optim", "train.seed"]
    check_resume_recipe(saved, new, where="x")
    only_lr = _recipe("optim.lr=1e-3", "optim.beta2=0.99", "checkpoint.allow_changes=[optim.lr]")
    assert [k for k, _, _ in recipe_changes(saved, only_lr, allowed=["optim.lr"])] == ["optim.beta2"]


def test_grpo_rollout_engine_choice_never_blocks():
    saved = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m"]))
    new = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m", "grpo.rollout.engine=torch"]))
    check_resume_recipe(saved, new, where="x")
    changed = to_dict(load_recipe("recipes/tiny_cpu_grpo.yaml", ["model.hf_path=/m", "grpo.sampling.temperature=0.5"]))
    assert [k for k, _, _ in recipe_changes(saved, changed)] == ["grpo.sampling.temperature"]


def test_resumed_logger_drops_replayed_rows_and_torn_lines(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False)
    for step in range(1, 6):
        log.log(step, {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a kill -9 in the middle of a write
    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False, resume_step=3)
    for step in range(4, 7):
        log.log(step, {"loss": 10.0 * step})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert truncate_metrics_jsonl(tmp_path / "metrics.jsonl", keep_through_step=6) == 0


# ---- run identity: what a resume compares beyond the recipe (training/run_identity.py) --------------


def _fingerprints(tmp_path, monkeypatch, *, full_max: int):
    from gazal_nemo.training import run_identity

    monkeypatch.setattr(run_identity, "FULL_HASH_MAX_BYTES", full_max)
    monkeypatch.setattr(run_identity, "SAMPLE_BLOCK_BYTES", 256)  # files over 16 x 256 bytes are sampled
    return run_identity.path_fingerprint


def _touch_later(path, seconds: int = 5) -> None:
    import os

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 10**9))


@pytest.mark.parametrize("full_max", [10**6, 1000], ids=["full-hash", "sampled"])
def test_input_changes_name_the_file_and_how_it_changed(tmp_path, monkeypatch, full_max):
    from gazal_nemo.training.resume_check import input_changes

    fingerprint = _fingerprints(tmp_path, monkeypatch, full_max=full_max)
    data = tmp_path / "data.jsonl"
    data.write_bytes(bytes(range(256)) * 40)  # 10240 bytes: above 1000, sampled
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 1}')
    (model / "model.safetensors").write_bytes(b"w" * 5000)
    (model / "README.md").write_text("not fingerprinted")
    saved = {"sft_data.sources.0.path": fingerprint(data), "model.hf_path": fingerprint(model)}
    assert "sampled_sha256" in saved["model.hf_path"]["files"]["model.safetensors"] or full_max > 5000
    assert set(saved["model.hf_path"]["files"]) == {"config.json", "model.safetensors"}

    def now():
        return {"sft_data.sources.0.path": fingerprint(data), "model.hf_path": fingerprint(model)}

    assert input_changes(saved, now()) == []
    (model / "README.md").write_text("edited")  # not an input
    _touch_later(model / "config.json")  # small file, same bytes: not a change
    assert input_changes(saved, now()) == []
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1  # the first block is always sampled
    data.write_bytes(bytes(raw))
    (model / "model.safetensors").write_bytes(b"w" * 4999)
    (model / "tokenizer.json").write_text("{}")
    changes = input_changes(saved, now())
    assert changes == [("model.hf_path", str(model / "model.safetensors"), "5000 -> 4999 bytes"),
                       ("model.hf_path", str(model / "tokenizer.json"), "new file"),
                       ("sft_data.sources.0.path", str(data), "same size, other contents")]
    assert input_changes(saved, now(), allowed=["model", str(data)]) == []  # a key prefix and a path
    assert [c[1] for c in input_changes(saved, now(), allowed=[str(model)])] == [str(data)]  # a folder path
    (model / "model.safetensors").unlink()
    assert ("model.hf_path", str(model / "model.safetensors"), "removed") in input_changes(saved, now())


def test_a_sampled_file_rewritten_with_the_same_bytes_where_sampled_counts_as_changed(tmp_path, monkeypatch):
    from gazal_nemo.training.resume_check import input_changes

    fingerprint = _fingerprints(tmp_path, monkeypatch, full_max=1000)
    shard = tmp_path / "model-00001.safetensors"
    shard.write_bytes(bytes(200_000))
    saved = {"model.hf_path": fingerprint(shard)}
    raw = bytearray(shard.read_bytes())
    raw[100_123] = 7  # between two sampled blocks: only the modification time tells
    shard.write_bytes(bytes(raw))
    _touch_later(shard)
    assert input_changes(saved, {"model.hf_path": fingerprint(shard)}) == [
        ("model.hf_path", str(shard), "rewritten (modification time moved; too large to compare every byte)")]


# ---- who owns a folder (gazal_nemo/ownership.py, training/run_folder.py) -------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_owner_gone_rules(monkeypatch):
    import os
    import socket
    import time

    from gazal_nemo.ownership import owner_gone, process_start, this_process

    host = socket.gethostname()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert owner_gone(this_process()) is None  # ourselves
    assert owner_gone({"host": host, "pid": os.getppid(), "start": process_start(os.getppid())}) is None
    assert "no longer running" in owner_gone({"host": host, "pid": _dead_pid(), "start": None})
    assert "no longer running" in owner_gone({"host": host, "pid": os.getpid(), "start": "1"})  # pid reused
    remote = {"host": host + "-other", "pid": 12, "slurm_job_id": "88", "slurm_restart_count": "0"}
    assert owner_gone(remote) is None  # cannot be checked, no heartbeat rule asked for
    assert owner_gone(remote, heartbeat_mtime=time.time() - 30, stale_after_s=600) is None
    assert "heartbeat is 9" in owner_gone(remote, heartbeat_mtime=time.time() - 900, stale_after_s=600)
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert owner_gone(remote) is None  # the same run of the same job: a second step of it
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert "Slurm job 88, which has been requeued" in owner_gone(remote)


def test_run_lock_is_exclusive_and_taken_over_from_a_dead_owner(tmp_path):
    import json
    import socket

    from gazal_nemo.training.run_folder import LOCK_FILE, RunLock, lock_problem

    first = RunLock(tmp_path / "ckpt")
    assert first.acquire() is None and first.held()
    with pytest.raises(ValueError, match=r"in use by another run, pid \d+ on host"):
        RunLock(tmp_path / "ckpt").acquire()
    assert lock_problem(tmp_path / "ckpt")[0] is not None
    first.release()
    assert not (tmp_path / "ckpt" / LOCK_FILE).exists()
    pid = _dead_pid()
    (tmp_path / "ckpt" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    assert lock_problem(tmp_path / "ckpt") == (None, lock_problem(tmp_path / "ckpt")[1])
    second = RunLock(tmp_path / "ckpt")
    note = second.acquire()
    assert note.startswith(f"taking over {tmp_path / 'ckpt' / LOCK_FILE} of pid {pid}") and second.held()
    (tmp_path / "ckpt" / LOCK_FILE).write_text("{cut")  # a lock torn by a crash is a dead owner's
    assert "unreadable" in RunLock(tmp_path / "ckpt").acquire()


def test_a_logger_never_rewrites_another_runs_rows(tmp_path):
    from gazal_nemo.training.metrics import claim_logging_dir, logging_dir_problem
    from gazal_nemo.training.run_identity import RunIdentity, set_active_run

    log = MetricsLogger(tmp_path, total_steps=3, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0})
    log.close()
    claim_logging_dir(tmp_path, {"run_id": "first", "checkpoint_dir": "/runs/a"})
    before = (tmp_path / "metrics.jsonl").read_bytes()
    assert logging_dir_problem(tmp_path, "first", adopt_unmarked=False) is None
    problem = logging_dir_problem(tmp_path, "second", adopt_unmarked=False)
    assert problem.startswith(f"logging.dir={tmp_path}: holds the metrics of run first (checkpoint.dir /runs/a")
    set_active_run(RunIdentity(run_id="second"))
    try:
        with pytest.raises(ValueError, match="holds the metrics of run first"):
            MetricsLogger(tmp_path, total_steps=3, tensorboard=False, resume_step=0)
    finally:
        set_active_run(None)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
