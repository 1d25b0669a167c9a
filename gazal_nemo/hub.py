"""Resolve a model reference (a local Hugging Face folder, or a hub id downloaded once) and
check that the folder holds what every stage, the evaluator and the converter read from it.

Without tokenizer files transformers quietly builds a one-token tokenizer, and without a
chat template it fails deep inside the first `apply_chat_template` with a message that
names neither the folder nor the file; a config whose vocab_size is smaller than the
tokenizer ends in an IndexError inside the embedding. `check_model_dir` refuses all three
up front. A path like `runs/sft-export` that does not exist is not sent to the hub as an
id when `runs/` is a local folder, and a hub lookup that fails says which key, which path
and why, not "Cannot find an appropriate cached snapshot folder".
"""

from __future__ import annotations

import json
from pathlib import Path

from gazal_nemo.config_io import require_file

_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "merges.txt", "vocab.json"]
# Any one of these is a tokenizer transformers can load (fast, sentencepiece, byte-level BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def resolve_model_dir(path_or_id: str, *, config_only: bool = False, what: str = "model folder") -> Path:
    """A local folder as is; otherwise download the hub repo's config, weights and tokenizer
    (only config.json when `config_only`: a dry run must not pull 64 GB of weights).
    The folder is checked with `check_model_dir` (a download with `config_only`: its config only)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir():  # everything is already here, so check everything (cheap), dry run or not
        return check_model_dir(local, what=what)
    if local.exists() or local.is_symlink():
        raise ValueError(f"{what}={path_or_id!r}: not a folder (expected a Hugging Face model folder)")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1:
        raise FileNotFoundError(f"{what}={path_or_id!r}: no such folder ({local.absolute()} does not exist), "
                                "and not a hub id like 'Qwen/Qwen3-32B'")
    owner = Path(path_or_id.split("/")[0]).expanduser()
    if owner.is_dir():  # `runs/sft-export` next to a runs/ folder: a local path that is missing
        raise FileNotFoundError(f"{what}={path_or_id!r}: no such folder: {local.absolute()} does not exist "
                                f"(taken as a local path because {owner.absolute()} is a folder here)")
    from huggingface_hub import snapshot_download

    patterns = ["config.json"] if config_only else _MODEL_FILES
    try:
        model_dir = Path(snapshot_download(repo_id=path_or_id, allow_patterns=patterns))
    except Exception as e:  # offline, no such repo, gated, network: one line naming key and path
        reason = (str(e).strip().splitlines() or [""])[-1][:300]
        raise FileNotFoundError(f"{what}={path_or_id!r}: no such local folder ({local.absolute()} does not exist), "
                                f"and as a hub id it could not be fetched ({type(e).__name__}: {reason})") from None
    return check_model_dir(model_dir, what=what, config_only=config_only)


def check_model_dir(model_dir: str | Path, *, what: str = "model folder", config_only: bool = False) -> Path:
    """`model_dir` if it has a readable config.json, tokenizer files and a chat template;
    otherwise ValueError naming the folder and what is missing (FileNotFoundError: no config.json)."""
    model_dir = Path(model_dir)
    config = read_json_file(model_dir / "config.json", f"{what}: config")
    if config_only:
        return model_dir
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{what}: {model_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                         "copy them from the base model's folder")
    if not has_chat_template(model_dir):
        raise ValueError(f"{what}: the tokenizer in {model_dir} has no chat template (no chat_template in "
                         f"tokenizer_config.json, no {' or '.join(CHAT_TEMPLATE_FILES)}); copy it from the base model")
    num_tokens = tokenizer_size(model_dir)
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and num_tokens is not None and num_tokens > vocab_size:
        raise ValueError(f"{what}: {model_dir}/config.json has vocab_size={vocab_size}, smaller than its tokenizer "
                         f"({num_tokens} tokens): ids >= {vocab_size} have no embedding row; use the tokenizer the "
                         "model was trained with, or a model whose vocab_size covers it")
    return model_dir


def tokenizer_size(model_dir: Path) -> int | None:
    """1 + the largest token id the folder's tokenizer can produce (read from tokenizer.json or
    vocab.json plus the added tokens); None when there is no file we can read that from."""
    ids: list[int] = []
    if (model_dir / "tokenizer.json").is_file():
        data = read_json_file(model_dir / "tokenizer.json", "tokenizer")
        vocab = (data.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            ids += [i for i in vocab.values() if isinstance(i, int)]
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
            ids.append(len(vocab) - 1)
        ids += [t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)]
    elif (model_dir / "vocab.json").is_file():
        ids += [i for i in read_json_file(model_dir / "vocab.json", "tokenizer vocab").values() if isinstance(i, int)]
    else:
        return None
    if (model_dir / "tokenizer_config.json").is_file():
        added = read_json_file(model_dir / "tokenizer_config.json", "tokenizer config").get("added_tokens_decoder")
        ids += [int(i) for i in (added or {}) if str(i).isdigit()]
    return max(ids) + 1 if ids else None


def has_chat_template(model_dir: Path) -> bool:
    """Where transformers looks for one: its own files, or `chat_template` in tokenizer_config.json."""
    if any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    if (model_dir / "additional_chat_templates").is_dir() and any((model_dir / "additional_chat_templates").iterdir()):
        return True
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    return bool(read_json_file(config_path, "tokenizer config").get("chat_template"))


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from `path`, or ValueError / FileNotFoundError naming the file and the problem."""
    path = require_file(path, what)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object, got a {type(data).__name__}")
    return data
