"""Test fixtures: tiny Qwen3 folders, data files and the config-only Qwen3-32B, made at test time.

The makers are production code (`gazal demo` builds its model with them); tests import
them from here so a fixture has one name wherever it is used.
"""

from gazal_nemo.data.sources import write_jsonl
from gazal_nemo.models.qwen3_configs import QWEN3_32B_CONFIG
from gazal_nemo.models.tiny import (
    CHATML_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    make_tiny_qwen3,
    make_tiny_tokenizer,
    tiny_qwen3_config,
)

__all__ = ["CHATML_TEMPLATE", "QWEN3_32B_CONFIG", "QWEN_SPECIAL_TOKENS", "make_tiny_qwen3", "make_tiny_tokenizer",
           "tiny_qwen3_config", "write_jsonl"]
