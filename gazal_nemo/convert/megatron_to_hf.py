"""gazal checkpoint folder (megatron torch_dist) -> Hugging Face safetensors, streamed.

Runs in one process without a process group, whatever TP/PP wrote the checkpoint: a dist
checkpoint stores each global tensor as chunks, and a LoadPlanner that asks for one layer's
slice of a key reads only the chunks overlapping that slice. The export therefore walks the
model layer by layer (embedding, layer 0..L-1, final norm + head), splits fused QKV and
gate/up back into HF tensors, and streams them into safetensors shards whose headers are
fixed up front from config.json. Host memory holds one layer, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from gazal_nemo.convert.dist_ckpt import (
    HF_SUBDIR,
    check_out_apart,
    check_output_dir,
    copy_hf_meta,
    parse_dtype,
    read_checkpoint_info,
    single_process_dcp,
    staged_output_dir,
    stored_entries,
    write_export_marker,
)
from gazal_nemo.convert.hf_io import HFCheckpointWriter
from gazal_nemo.convert.mapping import (
    MegatronParam,
    dist_key,
    hf_tensor_shapes,
    megatron_params,
    megatron_shape,
    to_hf,
)
from gazal_nemo.hub import check_model_dir
from gazal_nemo.models.qwen3 import Qwen3Shape

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default "5GB"; memory does not depend on it


def expected_dist_tensors(shape: Qwen3Shape) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every weight a Qwen3 of this config stores in a dist checkpoint."""
    hf_shapes = hf_tensor_shapes(shape)
    expected = {}
    for param in megatron_params(shape):
        one = megatron_shape(param, hf_shapes)
        expected[dist_key(param.name)] = one if param.layer is None else (shape.num_layers, *one)
    return expected


def validate_dist_tensors(entries: dict, shape: Qwen3Shape, ckpt_dir: Path, *, ignore_extra_keys: bool) -> None:
    """The checkpoint's tensor keys and global shapes against config.json, naming the first offenders."""
    expected = expected_dist_tensors(shape)
    stored = {k: tuple(v.size) for k, v in entries.items() if isinstance(v, TensorStorageMetadata)}
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise ValueError(f"{ckpt_dir}: tensors missing for its hf/config.json: {missing}")
    extra = sorted(set(stored) - set(expected))
    if extra and not ignore_extra_keys:
        raise ValueError(f"{ckpt_dir}: tensors a Qwen3 with its hf/config.json does not have: {extra[:8]}; "
                         "merge adapters before exporting, or pass --ignore-extra-keys to export only the base weights")
    for key, want in expected.items():
        if stored[key] != want:
            raise ValueError(f"{ckpt_dir}: tensor {key!r} has shape {stored[key]}, its hf/config.json implies {want}")


def export_groups(shape: Qwen3Shape) -> list[list[MegatronParam]]:
    """Parameters in HF file order, grouped so that one group is read from the checkpoint at a time."""
    params = megatron_params(shape)
    first = [p for p in params if p.layer is None and p.name.startswith("embedding.")]
    last = [p for p in params if p.layer is None and not p.name.startswith("embedding.")]
    layers = [[p for p in params if p.layer == i] for i in range(shape.num_layers)]
    return [first, *layers, last]


def convert_megatron_to_hf(ckpt_dir: str | Path, out_dir: str | Path, *, dtype: str | torch.dtype | None = None,
                           overwrite: bool = False, hf_meta_dir: str | Path | None = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, ignore_extra_keys: bool = False,
                           progress: Callable[[str], None] | None = None, force: bool = False,
                           marker: dict | None = None) -> Path:
    """Export a gazal checkpoint folder (from the converter or `save_model`) as a HF Qwen3 folder.

    dtype: "bf16" / "fp32" (default: the checkpoint's). hf_meta_dir: config/tokenizer source
    when the folder has no `hf/` (a plain megatron checkpoint). progress: called with each HF
    tensor name as it is written. overwrite: replace an out_dir that an earlier gazal conversion or
    export wrote; force: any. marker: more fields for the folder's gazal_export.json (e.g. the run's
    identity).
    """
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    check_out_apart(out_dir, {"--ckpt-dir": ckpt_dir, "--hf-meta-dir": hf_meta_dir})
    check_output_dir(out_dir, overwrite=overwrite, force=force)
    read_checkpoint_info(ckpt_dir)  # refuses folders written by a newer format
    meta_dir = Path(hf_meta_dir) if hf_meta_dir is not None else ckpt_dir / HF_SUBDIR
    check_model_dir(meta_dir, what="--hf-meta-dir" if hf_meta_dir is not None else "checkpoint hf/ folder")
    shape = Qwen3Shape.from_pretrained(meta_dir)
    reader = DistCheckpointReader(ckpt_dir)
    validate_dist_tensors(reader.entries, shape, ckpt_dir, ignore_extra_keys=ignore_extra_keys)
    target_dtype = parse_dtype(dtype) or reader.dtype(dist_key("embedding.word_embeddings.weight"))
    groups = export_groups(shape)
    hf_shapes = hf_tensor_shapes(shape)
    specs = [(name, target_dtype, hf_shapes[name]) for group in groups for p in group for name in p.hf_names]

    with staged_output_dir(out_dir, overwrite=overwrite, force=force) as stage:
        writer = HFCheckpointWriter(stage, specs, max_shard_bytes=max_shard_bytes)
        for group in groups:
            for name, tensor in _hf_tensors(reader, group, shape):
                writer.write(name, tensor.to(target_dtype))
                if progress is not None:
                    progress(name)
        writer.close()
        copy_hf_meta(meta_dir, stage, dtype=target_dtype)
        write_export_marker(stage, {"written_by": "gazal convert megatron-to-hf", "source": str(ckpt_dir.resolve()),
                                    **(marker or {})})
    return out_dir


def _hf_tensors(reader: DistCheckpointReader, group: list[MegatronParam], shape: Qwen3Shape):
    """Read one group's slices in a single pass over the checkpoint and yield its HF tensors."""
    requests = {}
    for param in group:
        key = dist_key(param.name)
        size = reader.entries[key].size
        offsets = (0,) * len(size) if param.layer is None else (param.layer,) + (0,) * (len(size) - 1)
        sizes = tuple(size) if param.layer is None else (1, *size[1:])
        requests[key] = (offsets, sizes)
    slices = reader.read(requests)
    for param in group:
        tensor = slices[dist_key(param.name)]
        if param.layer is not None:
            tensor = tensor[0]
        yield from to_hf(param, tensor, shape).items()


class DistCheckpointReader:
    """Reads slices of the global tensors of a dist checkpoint, in one process, no process group."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.entries = stored_entries(self.dir)
        self._storage = _CachedMetadataReader(str(self.dir))

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].properties.dtype

    def read(self, requests: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """key -> (offsets, sizes) of the wanted slice; returns key -> tensor in the stored dtype."""
        targets = {key: torch.empty(sizes, dtype=self.dtype(key)) for key, (_, sizes) in requests.items()}
        offsets = {key: off for key, (off, _) in requests.items()}
        with single_process_dcp():
            dcp.load({}, storage_reader=self._storage, planner=_SliceLoadPlanner(offsets, targets), no_dist=True)
        return targets


class _CachedMetadataReader(FileSystemReader):
    """Reads `.metadata` once per export instead of once per layer."""

    def __init__(self, path: str):
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _SliceLoadPlanner(DefaultLoadPlanner):
    """Plans reads of given slices of stored tensors into preallocated targets."""

    def __init__(self, offsets: dict[str, tuple[int, ...]], targets: dict[str, torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._offsets = offsets
        self._targets = targets

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, target in self._targets.items():
            wanted = ChunkStorageMetadata(offsets=torch.Size(self._offsets[key]), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [wanted])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        target = self._targets[read_item.dest_index.fqn]
        return narrow_tensor_by_index(target, read_item.dest_offsets, read_item.lengths)
