"""Shared fixtures: a tiny Qwen3 checkpoint made once per session (no downloads)."""

import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Random-init 2-layer Qwen3 (GQA 4/2, qk-norm, untied) with a ChatML tokenizer."""
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir_tied(tmp_path_factory):
    """Same shape with tied embeddings and 4 layers (for PP=2 with 2 layers a stage)."""
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_tied"), seed=1,
                           tie_word_embeddings=True, num_hidden_layers=4)


@pytest.fixture(scope="session")
def tiny_vllm_dir(tmp_path_factory):
    """The tiny Qwen3 with head_dim 32: the smallest head vLLM's CPU attention kernels take."""
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    return make_tiny_qwen3(tmp_path_factory.mktemp("tiny_qwen3_vllm"), seed=0, head_dim=32)
