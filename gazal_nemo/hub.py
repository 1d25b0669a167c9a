"""Resolve a model reference: a local Hugging Face folder, or a hub id downloaded once."""

from __future__ import annotations

from pathlib import Path

_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "merges.txt", "vocab.json"]


def resolve_model_dir(path_or_id: str) -> Path:
    """A local folder as is; otherwise download the hub repo's config, weights and tokenizer."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path_or_id.startswith((".", "/")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"model.hf_path={path_or_id!r}: not a folder and not a hub id like 'Qwen/Qwen3-32B'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=path_or_id, allow_patterns=_MODEL_FILES))
