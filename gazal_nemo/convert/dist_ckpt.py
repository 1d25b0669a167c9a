"""The gazal checkpoint folder, and saving / loading a live (TP/PP-split) model to it.

A folder is a megatron-core distributed checkpoint (torch_dist backend: `.metadata`,
`*.distcp`, `common.pt`, `metadata.json`) plus two things megatron does not keep:
  * `hf/`: the Hugging Face config, generation config and tokenizer files, so exporting to
    HF needs nothing but this folder;
  * `gazal_checkpoint.json`: format version, where the weights came from, their dtype.
Tensors live under the keys of `model.sharded_state_dict()`, every layer's copy stacked on a
leading axis, so a checkpoint written at one TP/PP loads at any other.

Folders appear atomically: everything is written into a hidden `.<name>.partial*` sibling
and renamed into place at the end, so a crash never leaves a folder that looks complete.
A converter's staging folder holds an owner marker (host, pid, process start time); the
next run to the same output removes staging folders whose owner is gone (kill -9, power
loss), so a crashed 32B conversion does not leak tens of GB.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.distributed as dist

from gazal_nemo.ownership import owner_gone, this_process
from gazal_nemo.ownership import process_start as _process_start  # noqa: F401 - tests read the marker's start

CHECKPOINT_INFO = "gazal_checkpoint.json"
EXPORT_MARKER = "gazal_export.json"  # in every HF / adapter folder a gazal conversion or export wrote
STAGE_OWNER_FILE = ".gazal_stage_owner.json"  # inside a staging folder; removed before it is published
_UNOWNED_STAGE_MAX_AGE_S = 3600  # staging folders without a marker (older code) are removed after this
HF_SUBDIR = "hf"
FORMAT_VERSION = 1
MEGATRON_MARKER = "metadata.json"  # megatron writes it last; its presence means "a dist checkpoint"
CONFIG_FILE = "config.json"
# Everything besides weights that `from_pretrained` and the tokenizer read back.
HF_META_FILES = (
    CONFIG_FILE, "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
)
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """`--dtype` value -> torch dtype; None means "keep the source dtype"."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r}; allowed: {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The spelling HF configs use ("bfloat16", "float32")."""
    return str(dtype).removeprefix("torch.")


def overlap(path: str | Path, other: str | Path) -> str | None:
    """How `path` sits relative to `other` ("is", "contains", "lies inside"; None: apart), on the
    real paths (symlinks followed, so two spellings of one folder are one)."""
    a, b = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    if a == b:
        return "is"
    if a in b.parents:
        return "contains"
    if b in a.parents:
        return "lies inside"
    return None


def check_out_apart(out_dir: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside an input (flag -> path): writing it would
    replace or mix with what the conversion reads."""
    for flag, path in inputs.items():
        how = overlap(out_dir, path) if path else None
        if how is not None:
            raise ValueError(f"--out={out_dir}: {how} the input {flag} {Path(path).expanduser().resolve()}; "
                             "write the output elsewhere")


def is_gazal_output(folder: str | Path) -> bool:
    """Whether a gazal conversion or export wrote this folder (its marker file is there)."""
    folder = Path(folder)
    return (folder / EXPORT_MARKER).is_file() or (folder / CHECKPOINT_INFO).is_file()


def write_export_marker(folder: str | Path, record: dict) -> None:
    """The marker that lets a later `--overwrite` replace this folder; `record` says what wrote it
    and from what (written_by, source, and for training outputs the step and run identity)."""
    record = {**record, "created_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def check_output_dir(out_dir: str | Path, *, overwrite: bool, force: bool = False) -> Path:
    """Refuse to replace an existing output unless asked to (checked before any heavy work).
    `overwrite` replaces only an empty folder or one a gazal conversion or export wrote (its
    marker); `force` replaces any folder."""
    from gazal_nemo.config_io import require_writable_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and not (overwrite or force):
        raise ValueError(f"{out_dir}: output already exists; pass --overwrite (overwrite=True) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and not force and any(out_dir.iterdir()) and not is_gazal_output(out_dir):
        raise ValueError(f"{out_dir}: exists and was not written by a gazal conversion or export (no {EXPORT_MARKER} "
                         f"or {CHECKPOINT_INFO}); --overwrite replaces only those; pass --force to replace it anyway")
    require_writable_dir(out_dir, "--out")
    return out_dir


def publish_dir(stage: Path, out_dir: Path) -> None:
    """Rename a finished stage folder to out_dir, replacing an older out_dir only at the end."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(stage, out_dir)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def staged_output_dir(out_dir: str | Path, *, overwrite: bool, force: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling of out_dir, empty but for its owner marker; on success it becomes
    out_dir (without the marker), on error it is removed.

    Staging folders of earlier runs to the same out_dir whose owner process is gone are removed first.
    """
    out_dir = check_output_dir(out_dir, overwrite=overwrite, force=force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        (stage / STAGE_OWNER_FILE).write_text(json.dumps(this_process()) + "\n")
        yield stage
        (stage / STAGE_OWNER_FILE).unlink()
        publish_dir(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def remove_stale_stages(out_dir: Path) -> list[Path]:
    """Remove `.<out_dir name>.partial-*` folders whose owner process has died; returns them.

    A folder owned by a live process (a concurrent run), or by a process on another host
    (whose liveness cannot be checked from here), is left alone.
    """
    removed = []
    for stage in sorted(out_dir.parent.glob(f".{glob.escape(out_dir.name)}.partial-*")):
        if stage.is_dir() and not stage.is_symlink() and _stage_is_abandoned(stage):
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
            print(f"removed {stage}: staging folder of a conversion that is no longer running", file=sys.stderr)
    return removed


def _stage_is_abandoned(stage: Path) -> bool:
    marker = stage / STAGE_OWNER_FILE
    try:
        owner = json.loads(marker.read_text())
    except FileNotFoundError:  # written by older code, or a run that is just starting
        try:
            return time.time() - stage.stat().st_mtime > _UNOWNED_STAGE_MAX_AGE_S
        except OSError:
            return False
    except (OSError, ValueError):
        return False
    return owner_gone(owner) is not None  # no heartbeat: a stage of another host is left alone


def copy_hf_meta(src_dir: str | Path, dst_dir: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Copy config, generation config and tokenizer files; with `dtype`, the config says that dtype."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not (src_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{src_dir / CONFIG_FILE}: no config.json to carry with the weights")
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in HF_META_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)
    if dtype is not None:
        config = json.loads((dst_dir / CONFIG_FILE).read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        config.update({k: dtype_name(dtype) for k in keys})
        (dst_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_checkpoint_info(ckpt_dir: Path, *, source: str, dtype: torch.dtype, created_by: str, **extra) -> None:
    info = {"format": "gazal-megatron-dist", "format_version": FORMAT_VERSION, "source": source,
            "dtype": dtype_name(dtype), "created_by": created_by, **extra}
    (ckpt_dir / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")


def read_checkpoint_info(ckpt_dir: str | Path) -> dict | None:
    """The folder's gazal_checkpoint.json (None for a plain megatron checkpoint)."""
    from gazal_nemo.hub import read_json_file

    path = Path(ckpt_dir) / CHECKPOINT_INFO
    if not path.is_file():
        return None
    info = read_json_file(path, "checkpoint info")
    if info.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version={info.get('format_version')} is newer than this code "
                         f"understands (<= {FORMAT_VERSION})")
    return info


def stored_entries(ckpt_dir: str | Path) -> dict:
    """Key -> storage metadata of every tensor and object in a dist checkpoint.

    Reads `.metadata` and checks that every data file it names is there and long enough, so a
    missing or truncated `.distcp` is named now rather than failing inside torch's reader.
    """
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MEGATRON_MARKER).is_file() or not (ckpt_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt_dir}: not a megatron distributed checkpoint (no {MEGATRON_MARKER} "
                                "or .metadata)")
    try:
        metadata = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as e:  # unpickling a damaged file raises whatever the bytes happen to decode to
        raise ValueError(f"{ckpt_dir / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    check_storage_files(ckpt_dir, metadata.storage_data or {})
    return dict(metadata.state_dict_metadata)


def check_storage_files(ckpt_dir: Path, storage_data: dict) -> None:
    """Every `.distcp` file the metadata names exists and holds the byte ranges it points at."""
    needed: dict[str, tuple[int, str]] = {}
    for index, info in storage_data.items():
        end = info.offset + info.length
        if end > needed.get(info.relative_path, (0, ""))[0]:
            needed[info.relative_path] = (end, index.fqn)
    for relative_path, (end, key) in sorted(needed.items()):
        path = ckpt_dir / relative_path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: data file of tensor {key!r} is missing from the checkpoint")
        size = path.stat().st_size
        if size < end:
            raise ValueError(f"{path}: truncated ({size} bytes, tensor {key!r} needs {end}); the checkpoint "
                             "is damaged, convert or save it again")


@contextmanager
def single_process_dcp() -> Iterator[None]:
    """torch.distributed.checkpoint used on purpose without a process group (converters): no warning.

    torch wraps any failure inside its reader/writer (our KeyboardInterrupt, a ValueError naming
    a truncated shard) in a CheckpointException; with one process there is one failure, and it
    is re-raised as itself so that Ctrl-C stays Ctrl-C and the CLI can print the message.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            failures = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f]
            if len(failures) != 1 or not isinstance(failures[0], BaseException):
                raise
            raise failures[0] from None


def _unwrap(model):
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def save_model(model, ckpt_dir: str | Path, *, hf_meta_dir: str | Path, source: str = "training") -> Path:
    """Save a live megatron Qwen3 (every rank of the job calls this) as a gazal checkpoint folder.

    `hf_meta_dir` is where config.json and the tokenizer come from: the original HF folder or
    the `hf/` of the checkpoint training started from. An existing `ckpt_dir` is replaced
    only once the new one is complete.
    """
    from megatron.core import dist_checkpointing, parallel_state

    model = _unwrap(model)
    ckpt_dir, hf_meta_dir = Path(ckpt_dir), Path(hf_meta_dir)
    if not (hf_meta_dir / CONFIG_FILE).is_file():  # every rank checks, so every rank fails alike
        raise FileNotFoundError(f"{hf_meta_dir / CONFIG_FILE}: hf_meta_dir must hold the model's config.json")
    stage = ckpt_dir.with_name(f".{ckpt_dir.name}.partial")  # one name that every rank can compute
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)  # left by a crashed save
        stage.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(stage))
    if rank == 0:
        copy_hf_meta(hf_meta_dir, stage / HF_SUBDIR)
        dtype = next(model.parameters()).dtype
        write_checkpoint_info(stage, source=source, dtype=dtype, created_by="save_model",
                              saved_at_tp=parallel_state.get_tensor_model_parallel_world_size(),
                              saved_at_pp=parallel_state.get_pipeline_model_parallel_world_size())
        publish_dir(stage, ckpt_dir)
    dist.barrier()
    return ckpt_dir


def load_model(model, ckpt_dir: str | Path) -> None:
    """Fill a live megatron Qwen3 (every rank calls this) from a checkpoint folder, at any TP/PP.

    Works on folders from `convert_hf_to_megatron` and from `save_model`. Extra state that the
    checkpoint lacks (e.g. Transformer Engine's FP8 metadata when the weights came from HF)
    keeps the model's own value; a missing or mis-shaped tensor is an error naming its key.
    """
    from megatron.core import dist_checkpointing

    model = _unwrap(model)
    ckpt_dir = Path(ckpt_dir)
    stored = stored_entries(ckpt_dir)
    sharded = _present_in_checkpoint(model.sharded_state_dict(), stored, ckpt_dir)
    state = dist_checkpointing.load(sharded, str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}: model parameters not filled {missing[:5]}; unexpected {unexpected[:5]}")


def _present_in_checkpoint(sharded: dict, stored: dict, ckpt_dir: Path) -> dict:
    """Drop extra-state objects the checkpoint lacks; refuse absent or mis-shaped tensors by key."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    kept = {}
    for name, item in sharded.items():
        if isinstance(item, ShardedObject):
            if item.unique_key in stored:
                kept[name] = item
            elif not name.endswith("_extra_state"):
                raise ValueError(f"{ckpt_dir}: object {item.unique_key!r} (model {name}) not in checkpoint")
            continue
        if item.key not in stored:
            raise ValueError(f"{ckpt_dir}: tensor {item.key!r} (model {name}) not in checkpoint")
        stored_shape = tuple(getattr(stored[item.key], "size", ()))
        mismatch_allowed = getattr(item, "allow_shape_mismatch", False)  # megatron's padded-vocab case
        if isinstance(item, ShardedTensor) and not mismatch_allowed and tuple(item.global_shape) != stored_shape:
            raise ValueError(f"{ckpt_dir}: tensor {item.key!r} has shape {stored_shape} in the checkpoint, "
                             f"model {name} needs {tuple(item.global_shape)}")
        kept[name] = item
    return kept
