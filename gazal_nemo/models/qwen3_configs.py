"""The published `config.json` of the Qwen3 dense family, so a plan needs no download.

`gazal plan` (and anything else that only needs the architecture) reads these for a hub id
such as `Qwen/Qwen3-32B` instead of asking the hub, so it works offline and on a login
node without a token. Values as published on huggingface.co/Qwen/Qwen3-<size>/config.json
(transformers 4.51.0 era). A hub id not listed here (the `-Base` siblings among them: their
configs differ in max_position_embeddings and eos) is downloaded, config.json only.
"""

from __future__ import annotations

import copy

_COMMON = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# size: (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, tie_word_embeddings)
_SIZES = {
    "0.6B": (1024, 3072, 28, 16, True),
    "1.7B": (2048, 6144, 28, 16, True),
    "4B": (2560, 9728, 36, 32, True),
    "8B": (4096, 12288, 36, 32, False),
    "14B": (5120, 17408, 40, 40, False),
    "32B": (5120, 25600, 64, 64, False),
}


def _config(hidden: int, intermediate: int, layers: int, heads: int, tied: bool) -> dict:
    return dict(sorted({**_COMMON, "hidden_size": hidden, "intermediate_size": intermediate,
                        "num_hidden_layers": layers, "max_window_layers": layers,
                        "num_attention_heads": heads, "tie_word_embeddings": tied}.items()))


PUBLISHED_QWEN3_CONFIGS: dict[str, dict] = {f"Qwen/Qwen3-{size}": _config(*dims) for size, dims in _SIZES.items()}
"""Hub id -> its config.json as a dict."""

QWEN3_32B_CONFIG = PUBLISHED_QWEN3_CONFIGS["Qwen/Qwen3-32B"]
"""The paper's base model; a config-only folder made from it is enough for --dry-run and `gazal plan`."""


def published_config(hub_id: str) -> dict | None:
    """A copy of the published config.json of `hub_id`; None when it is not shipped."""
    config = PUBLISHED_QWEN3_CONFIGS.get(hub_id)
    return copy.deepcopy(config) if config is not None else None
