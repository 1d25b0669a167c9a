"""Hugging Face Qwen3 safetensors -> gazal checkpoint folder (megatron torch_dist), streamed.

Nothing here builds a model or a process group. The checkpoint's layout (keys, global
shapes, one chunk per layer) follows from config.json alone, so torch.distributed.checkpoint
gets a plan made of metadata, and a SavePlanner whose `resolve_data` reads, fuses and casts
a chunk from the safetensors files only when the writer asks for it. Host memory holds one
chunk at a time (one layer's largest tensor, or the embedding), never the model.

The layout is exactly what `model.sharded_state_dict()` asks for at TP=1/PP=1: keys with the
layer index folded into a leading axis (`mapping.dist_key`), un-split global tensors (fused
QKV in megatron's group-interleaved order, fc1 as [gate; up]). Megatron's loader cuts any
TP/PP slice out of those, including the [gate_r; up_r] pieces its SwiGLU factory requests.

Every check that can fail on user input (architecture, tensor names, shapes, dtypes, the
target TP/PP, an existing output) runs on config and headers before any weight is read.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from gazal_nemo.convert.dist_ckpt import (
    HF_SUBDIR,
    check_out_apart,
    check_output_dir,
    copy_hf_meta,
    parse_dtype,
    single_process_dcp,
    staged_output_dir,
    write_checkpoint_info,
)
from gazal_nemo.convert.hf_io import HFCheckpointReader
from gazal_nemo.convert.mapping import (
    MegatronParam,
    dist_key,
    hf_tensor_shapes,
    megatron_params,
    megatron_shape,
    to_megatron,
)
from gazal_nemo.models.qwen3 import Qwen3Shape

# Linears of the torch-native spec save an (empty) extra-state object per layer; writing them
# too lets a plain `dist_checkpointing.load(model.sharded_state_dict(), dir)` find every key.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class DistChunk:
    """One stored piece of a dist-checkpoint tensor: a parameter's global tensor for one layer."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_shape: tuple[int, ...]
    param: MegatronParam


def dist_chunks(shape: Qwen3Shape, hf_shapes: dict[str, tuple[int, ...]]) -> list[DistChunk]:
    """Every chunk of the checkpoint, in the order HF stores the weights (layer by layer)."""
    chunks = []
    for param in megatron_params(shape):
        one = megatron_shape(param, hf_shapes)
        zeros = (0,) * len(one)
        if param.layer is None:
            chunks.append(DistChunk(dist_key(param.name), zeros, one, one, param))
        else:
            chunks.append(DistChunk(dist_key(param.name), (param.layer, *zeros), (1, *one),
                                    (shape.num_layers, *one), param))
    return chunks


def extra_state_keys(num_layers: int) -> list[str]:
    """Storage keys megatron gives the per-layer extra-state objects (`ShardedObject.unique_key`)."""
    return [f"decoder.layers.{module}._extra_state/shard_{layer}_{num_layers}"
            for layer in range(num_layers) for module in EXTRA_STATE_MODULES]


def validate_hf_tensors(reader: HFCheckpointReader, shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """Names, shapes and dtypes of the HF tensors against config.json; returns the expected shapes."""
    expected = hf_tensor_shapes(shape)
    present = reader.names()
    # Some tied checkpoints still carry lm_head; it is accepted only as a true copy (checked below).
    tolerated = {"lm_head.weight"} if shape.tie_word_embeddings else set()
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"{reader.dir}: tensors missing for this config.json: {_listing(missing)}")
    extra = sorted(present - set(expected) - tolerated)
    if extra:
        raise ValueError(f"{reader.dir}: tensors that a Qwen3 with this config.json does not have: {_listing(extra)}")
    for name in sorted(expected):
        if reader.shape(name) != expected[name]:
            raise ValueError(f"{reader.dir}: tensor {name!r} has shape {reader.shape(name)}, "
                             f"config.json implies {expected[name]}")
        reader.dtype(name)  # refuses dtypes we do not convert, naming the tensor
    if tolerated & present and not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
        raise ValueError(f"{reader.dir}: config.json ties the embeddings but 'lm_head.weight' differs from "
                         "'model.embed_tokens.weight'")
    return expected


def _listing(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                           overwrite: bool = False, force: bool = False, tp: int = 1, pp: int = 1,
                           progress: Callable[[str], None] | None = None) -> Path:
    """Convert a HF Qwen3 folder into a gazal checkpoint folder that loads at any TP/PP.

    dtype: "bf16" / "fp32" (default: the dtype of the source embedding). tp/pp: a layout the
    checkpoint will be loaded at, refused now if the model cannot be split that way.
    overwrite: replace an out_dir that an earlier gazal conversion or export wrote; force: any.
    progress: called with each chunk's name as it is converted (CLI logging).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1 or pp < 1:
        raise ValueError(f"tp={tp} pp={pp}: both must be >= 1")
    shape = Qwen3Shape.from_pretrained(hf_dir)
    shape.check_parallel(tp=tp, pp=pp)
    check_out_apart(out_dir, {"--hf-dir": hf_dir})
    check_output_dir(out_dir, overwrite=overwrite, force=force)
    reader = HFCheckpointReader(hf_dir)
    hf_shapes = validate_hf_tensors(reader, shape)
    target_dtype = parse_dtype(dtype) or reader.dtype("model.embed_tokens.weight")

    def make_chunk(chunk: DistChunk) -> torch.Tensor:
        hf = {name: reader.get(name) for name in chunk.param.hf_names}
        tensor = to_megatron(chunk.param, hf, shape).to(target_dtype).reshape(chunk.sizes).contiguous()
        if progress is not None:
            progress(chunk.param.name)
        return tensor

    with staged_output_dir(out_dir, overwrite=overwrite, force=force) as stage:
        write_dist_checkpoint(stage, dist_chunks(shape, hf_shapes), extra_state_keys(shape.num_layers),
                              dtype=target_dtype, make_chunk=make_chunk)
        copy_hf_meta(hf_dir, stage / HF_SUBDIR)
        write_checkpoint_info(stage, source=str(hf_dir.resolve()), dtype=target_dtype, created_by="hf_to_megatron")
    return out_dir


def write_dist_checkpoint(ckpt_dir: Path, chunks: list[DistChunk], object_keys: list[str], *, dtype: torch.dtype,
                          make_chunk: Callable[[DistChunk], torch.Tensor]) -> None:
    """A megatron torch_dist checkpoint whose chunk data is produced on demand by `make_chunk`."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    # One file per chunk: torch's writer keeps every tensor of a file alive until the file is
    # done, so this is what bounds memory to one chunk.
    writer = dcp.FileSystemWriter(str(ckpt_dir), single_file_per_rank=False, thread_count=1)
    with single_process_dcp():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, object_keys, dtype, make_chunk),
                 no_dist=True)
    torch.save({}, ckpt_dir / COMMON_STATE_FNAME)  # a model-only checkpoint has no common state
    save_config(CheckpointingConfig("torch_dist", 1), str(ckpt_dir))


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan built from chunk metadata alone; data is made when the writer resolves an item."""

    def __init__(self, chunks: list[DistChunk], object_keys: list[str], dtype: torch.dtype,
                 make_chunk: Callable[[DistChunk], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, c.offsets): c for c in chunks}
        self._object_keys = object_keys
        self._dtype = dtype
        self._make_chunk = make_chunk

    def create_local_plan(self) -> SavePlan:
        properties = TensorProperties(dtype=self._dtype)
        items = [
            WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(
                          chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                          properties=properties, size=torch.Size(c.global_shape)))
            for c in self._chunks.values()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._object_keys]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        if write_item.type == WriteItemType.BYTE_IO:
            # megatron stores the list of a rank's objects under one key; here one empty state.
            buffer = io.BytesIO()
            torch.save([None], buffer)
            return buffer
        return self._make_chunk(self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))])
