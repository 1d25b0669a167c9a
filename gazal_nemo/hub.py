"""Resolve a model reference: a local Hugging Face folder, or a hub id downloaded once."""

from __future__ import annotations

from pathlib import Path

_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "merges.txt", "vocab.json"]


def resolve_model_dir(path_or_id: str, *, config_only: bool = False) -> Path:
    """A local folder as is; otherwise download the hub repo's config, weights and tokenizer
    (only config.json when `config_only`: a dry run must not pull 64 GB of weights)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"model.hf_path={path_or_id!r}: not a folder and not a hub id like 'Qwen/Qwen3-32B'")
    from huggingface_hub import snapshot_download

    patterns = ["config.json"] if config_only else _MODEL_FILES
    return Path(snapshot_download(repo_id=path_or_id, allow_patterns=patterns))
