"""Fixtures of the Slurm tests: the tiny model and data the jobs train on."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen3 and the demo's SFT/GRPO data files, in a folder every job can read (head_dim 32:
    vLLM's CPU kernels take it, for the asynchronous GRPO job)."""
    from gazal_nemo.commands.demo_data import write_demo_data
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("slurm_inputs")
    model = make_tiny_qwen3(root / "model", seed=0, head_dim=32)
    data = write_demo_data(root / "data", model, num_sft=16, num_grpo=32)
    return {"model": Path(model), "sft": Path(data["sft"]), "grpo": Path(data["grpo"])}
