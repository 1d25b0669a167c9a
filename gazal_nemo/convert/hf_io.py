"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time.

A 32B checkpoint is ~64 GB in bf16; the index maps each tensor to its shard, so readers
open only the shard that holds the tensor they need and never load the whole model.
The writer knows every tensor's name, dtype and shape before any data exists, so it
writes each shard's header first and then streams tensors into place: peak memory is one
tensor, not one shard.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


class HFCheckpointReader:
    """Lazy access to the tensors of a (sharded or single-file) safetensors checkpoint.

    Tensors are read with plain file reads into fresh memory rather than through a memory
    map: mapped pages a conversion has touched stay in the process's resident set until the
    file is closed, which would make a streamed 32B conversion look (and be accounted) as
    large as the model.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self._headers: dict[str, tuple[int, dict]] = {}
        if index.is_file():
            weight_map = _read_weight_map(index)
        elif single.is_file():
            weight_map = {k: single.name for k in self._header(single.name)[1]}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        shard, data_start, info = self._entry(name)
        begin, end = info["data_offsets"]
        dtype, shape = self.dtype(name), tuple(info["shape"])
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        with open(self.dir / shard, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise ValueError(f"{self.dir / shard}: truncated while reading tensor {name!r}")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)[2]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.dir}: tensor {name!r} has dtype {code}; supported: {sorted(SAFETENSORS_DTYPES)}")
        return SAFETENSORS_DTYPES[code]

    def _entry(self, name: str) -> tuple[str, int, dict]:
        """(shard file, offset of its data section, the tensor's header entry)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not in checkpoint")
        shard = self.weight_map[name]
        data_start, header = self._header(shard)
        if name not in header:
            raise ValueError(f"{self.dir / shard}: the index places {name!r} here but the file does not hold it")
        return shard, data_start, header[name]

    def _header(self, shard: str) -> tuple[int, dict]:
        """A shard's JSON header (read once): name -> {dtype, shape, data_offsets}."""
        if shard not in self._headers:
            path = self.dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named in the index is missing")
            data_start, header = read_safetensors_header(path)
            data_bytes = path.stat().st_size - data_start
            if any(entry["data_offsets"][1] > data_bytes for entry in header.values()):
                raise ValueError(f"{path}: file is shorter than its header says (truncated download?)")
            self._headers[shard] = (data_start, header)
        return self._headers[shard]


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, name -> entry) of a .safetensors file; ValueError naming the
    file when it is too short, cut inside its header, or the header is not safetensors JSON."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: {size} bytes, too short to be a safetensors file (truncated download?)")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"{path}: cut inside its header ({size} bytes, the header alone needs {length + 8}; "
                             "truncated download?)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid safetensors JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and "shape" in entry and "dtype" in entry):
            raise ValueError(f"{path}: header entry for tensor {name!r} is malformed")
    return 8 + length, header


def _read_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of model.safetensors.index.json, naming the file when it is broken."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor name -> shard file")
    return weight_map


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class SafetensorsShardWriter:
    """Write one .safetensors file whose tensor list is fixed up front, one tensor at a time.

    The header (names, dtypes, shapes, byte offsets) goes first; `write` then appends each
    tensor's bytes in the declared order, so the caller never holds more than one tensor.
    """

    def __init__(self, path: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        self._order = [name for name, _, _ in specs]
        self._next = 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape in specs:
            nbytes = _nbytes(dtype, shape)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self._specs = {name: (dtype, tuple(shape)) for name, dtype, shape in specs}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise AssertionError(f"{self.path}: got {name!r}, expected {expected!r} next")
        dtype, shape = self._specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: {tensor.dtype} {tuple(tensor.shape)} != declared {dtype} {shape}")
        self._file.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._file.close()
            raise AssertionError(f"{self.path}: {len(self._order) - self._next} declared tensors never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class HFCheckpointWriter:
    """A sharded HF checkpoint (shards + model.safetensors.index.json) written tensor by tensor.

    Tensors arrive in the declared order; shard boundaries are fixed up front from their
    sizes (HF's greedy rule: start a new shard when the next tensor would overflow), so only
    one shard file is open and no tensor is held after it is written.
    """

    def __init__(self, out_dir: str | Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], *,
                 max_shard_bytes: int):
        self.dir = Path(out_dir)
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        used = 0
        for spec in specs:
            nbytes = _nbytes(spec[1], spec[2])
            if self._shards[-1] and used + nbytes > max_shard_bytes:
                self._shards.append([])
                used = 0
            self._shards[-1].append(spec)
            used += nbytes
        count = len(self._shards)
        self._files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._shard_of = {name: i for i, shard in enumerate(self._shards) for name, _, _ in shard}
        self._total_bytes = sum(_nbytes(dtype, shape) for _, dtype, shape in specs)
        self._open_index: int | None = None
        self._writer: SafetensorsShardWriter | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index = self._shard_of[name]
        if index != self._open_index:
            expected = 0 if self._open_index is None else self._open_index + 1
            if index != expected:
                raise AssertionError(f"{name} belongs to {self._files[index]}, but {self._files[expected]} is next")
            if self._writer is not None:
                self._writer.close()
            self._writer = SafetensorsShardWriter(self.dir / self._files[index], self._shards[index])
            self._open_index = index
        self._writer.write(name, tensor)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._open_index != len(self._shards) - 1:
            raise AssertionError(f"{self.dir}: not every shard was written")
        index = {"metadata": {"total_size": self._total_bytes},
                 "weight_map": {name: self._files[i] for name, i in self._shard_of.items()}}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
