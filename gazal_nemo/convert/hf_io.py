"""Reading Hugging Face safetensors checkpoints one tensor at a time.

A 32B checkpoint is ~64 GB in bf16; the index maps each tensor to its shard, so readers
open only the shard that holds the tensor they need and never load the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class HFCheckpointReader:
    """Lazy access to the tensors of a (sharded or single-file) safetensors checkpoint."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor {name!r} not in checkpoint")
        shard = self.weight_map[name]
        if shard not in self._handles:
            path = self.dir / shard
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named in the index for {name!r} is missing")
            self._handles[shard] = safe_open(path, framework="pt")
        return self._handles[shard].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.weight_map[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.dir / shard, framework="pt")
        return tuple(self._handles[shard].get_slice(name).get_shape())
