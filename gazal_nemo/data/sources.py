"""Read SFT data sources with Hugging Face `datasets` and mix them by weight.

Each source is a local file / folder (.json, .jsonl, .parquet) or a hub dataset id. Its
columns are renamed to our field names (`DataSourceConfig.columns`), so everything after
this module sees one schema per format. Mixing is a fixed list of (source, row) pairs
drawn from the seed: a weight w takes round(w * rows) rows of a source (every row
floor(w) times, plus a seeded sample without replacement for the fraction), and the pairs
of all sources are shuffled together. Same seed and files, same order, on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gazal_nemo.data.config import FORMAT_FIELDS, DataSourceConfig

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_OPTIONAL_FIELDS = {"options"}  # open questions have no options column


@dataclass(frozen=True)
class SourceCount:
    """How many rows a source has and how many the mix drew from it."""

    path: str
    num_rows: int
    num_drawn: int


@dataclass
class MixedRows:
    """The mixed row order: `order[i] = (source_index, row_index)` into `datasets`."""

    sources: list[DataSourceConfig]
    datasets: list  # list[datasets.Dataset], columns already renamed to our field names
    order: np.ndarray  # [num_rows, 2] int64
    counts: list[SourceCount]

    def __len__(self) -> int:
        return len(self.order)

    def row(self, source_index: int, row_index: int) -> dict:
        return self.datasets[source_index][int(row_index)]


def load_source(source: DataSourceConfig):
    """The source as a `datasets.Dataset` with our field names as columns."""
    from datasets import load_dataset

    local = Path(source.path)
    if local.exists():
        builder, files = _local_files(local)
        dataset = load_dataset(builder, data_files={source.split: files}, split=source.split)
    elif _looks_like_local_path(source.path):
        raise ValueError(f"data source path {source.path} does not exist")
    else:
        dataset = load_dataset(source.path, split=source.split)
    if source.max_rows is not None and source.max_rows < len(dataset):
        dataset = dataset.select(range(source.max_rows))
    return _rename_to_fields(dataset, source)


def mix_sources(sources: list[DataSourceConfig], datasets: list, *, seed: int) -> MixedRows:
    """Draw rows from each source by weight and shuffle them together, deterministically."""
    rng = np.random.default_rng(seed)
    parts, counts = [], []
    for index, (source, dataset) in enumerate(zip(sources, datasets)):
        rows = _draw_rows(len(dataset), source.weight, rng)
        parts.append(np.stack([np.full_like(rows, index), rows], axis=1))
        counts.append(SourceCount(path=source.path, num_rows=len(dataset), num_drawn=len(rows)))
    order = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
    order = order[rng.permutation(len(order))]
    return MixedRows(sources=list(sources), datasets=list(datasets), order=order, counts=counts)


def load_mixed_rows(sources: list[DataSourceConfig], *, seed: int) -> MixedRows:
    """Load every source and mix them (see the module docstring for the weight semantics)."""
    return mix_sources(sources, [load_source(source) for source in sources], seed=seed)


def _draw_rows(num_rows: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """Row indices: every row floor(w) times, then a seeded sample for the fractional part."""
    if num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    num_drawn = int(round(weight * num_rows))
    whole, remainder = divmod(num_drawn, num_rows)
    extra = np.sort(rng.choice(num_rows, size=remainder, replace=False)).astype(np.int64)
    return np.concatenate([np.tile(np.arange(num_rows, dtype=np.int64), whole), extra])


def _local_files(path: Path) -> tuple[str, list[str]]:
    """The `datasets` builder name and the data files of a local file or folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS)
    if not files:
        raise ValueError(f"data source {path}: no {sorted(_BUILDERS)} files found")
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise ValueError(f"data source {path}: unsupported file type; allowed: {sorted(_BUILDERS)}")
    if len(builders) > 1:
        raise ValueError(f"data source {path}: mixes json and parquet files; use one source per file type")
    return builders.pop(), [str(p) for p in files]


def _looks_like_local_path(path: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else that does not exist is a missing file."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix in _BUILDERS


def _rename_to_fields(dataset, source: DataSourceConfig):
    fields = FORMAT_FIELDS[source.format]
    present = [field for field in fields if source.column(field) in dataset.column_names]
    missing = [
        source.column(field) for field in fields if field not in present and field not in _OPTIONAL_FIELDS
    ]
    if missing:
        raise ValueError(
            f"data source {source.path}: missing column(s) {missing} for format {source.format!r}; "
            f"the data has {dataset.column_names} (map them with `columns`)"
        )
    dataset = dataset.select_columns([source.column(field) for field in present])
    renames = {source.column(field): field for field in present if source.column(field) != field}
    return dataset.rename_columns(renames) if renames else dataset
