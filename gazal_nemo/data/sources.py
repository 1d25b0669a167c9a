"""Read SFT data sources and mix them by weight.

Each source is a local file / folder (.json, .jsonl, .parquet) or a hub dataset id. Its
columns are renamed to our field names (`DataSourceConfig.columns`), so everything after
this module sees one schema per format.

Local JSON is read here line by line rather than with `datasets`' JSON loader, which
refuses a whole file for one broken line: a line that is not a JSON object (bad JSON, not
UTF-8, a bare list) becomes a row holding only `MALFORMED_FIELD` (why, with the line
number), so it counts as a bad row under `max_bad_fraction` like a row with a missing
field. Parquet and hub datasets go through `datasets`. A JSON object that gives a key twice
(`"options": {"B": .., "B": ..}`) is a bad row naming the key: JSON keeps only the last
value, so the row would silently mean something else (an option lost, the gold letter
shifted).

Mixing is a fixed list of (source, row) pairs drawn from the seed: a weight w takes
round(w * rows) rows of a source (every row floor(w) times, plus a seeded sample without
replacement for the fraction), and the pairs of all sources are shuffled together. Same
seed and files, same order, on every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gazal_nemo.config_io import require_file
from gazal_nemo.data.config import FORMAT_FIELDS, DataSourceConfig

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_OPTIONAL_FIELDS = {"options"}  # open questions have no options column
MALFORMED_FIELD = "__malformed__"
"""Key of the placeholder row that stands for an unreadable JSON line; its value says why."""


class BadRowError(ValueError):
    """A row that cannot become a training example or a question; the message says why."""


@dataclass(frozen=True)
class BadRow:
    """An unusable row: which source file / dataset, which row (index from 0), and why."""

    source: str
    row: int
    """Index of the row in its source, from 0; reports print it from 1 (`row + 1`)."""
    reason: str


class _KeyGivenTwice(dict):
    """A parsed JSON object that gave `repeated` more than once (JSON keeps the last value)."""

    repeated: str


def _object_hook(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _KeyGivenTwice(obj)
    marked.repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


def parse_json(text: str | bytes) -> Any:
    """json.loads that remembers keys given twice: read them back with `repeated_key`."""
    return json.loads(text, object_pairs_hook=_object_hook)


def repeated_key(value: Any, path: str = "") -> str | None:
    """Dotted path of the first key some object inside `value` gives twice ("options.B"), or None."""
    if isinstance(value, _KeyGivenTwice):
        return f"{path}{value.repeated}"
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, child in children:
        found = repeated_key(child, f"{path}{name}.")
        if found is not None:
            return found
    return None


def key_given_twice(where: str, key: str) -> str:
    """The bad-row reason for a JSON object with a repeated key."""
    return f"{where}: key {key!r} is given twice (JSON keeps only the last value)"


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
    datasets: list  # per source: a datasets.Dataset or a list of dicts, columns renamed to our field names
    order: np.ndarray  # [num_rows, 2] int64
    counts: list[SourceCount]

    def __len__(self) -> int:
        return len(self.order)

    def row(self, source_index: int, row_index: int) -> dict:
        return self.datasets[source_index][int(row_index)]


def load_source(source: DataSourceConfig):
    """The source's rows with our field names as columns: a list of dicts (local JSON) or a
    `datasets.Dataset` (parquet, hub)."""
    if is_local_source(source.path):
        dataset = read_local_rows(source.path, split=source.split)
    else:
        from datasets import load_dataset

        dataset = load_dataset(source.path, split=source.split)
    if source.max_rows is not None and source.max_rows < len(dataset):
        dataset = dataset[: source.max_rows] if isinstance(dataset, list) else dataset.select(range(source.max_rows))
    if isinstance(dataset, list):
        return _rename_row_fields(dataset, source)
    return _rename_to_fields(dataset, source)


def is_local_source(path: str) -> bool:
    """True for a local file or folder; raises ValueError for a local-looking path that is not there.

    Hub ids are `name` or `owner/name` without a data-file suffix; anything else is taken as
    a local path, so a typo in a file name fails now instead of as a failed hub download.
    """
    local = Path(path).expanduser()
    if local.is_symlink() or local.exists():
        return True
    if _looks_like_local_path(path):
        raise ValueError(f"data source path {path} does not exist")
    return False


def check_local_source(path: str, key: str) -> None:
    """Cheap pre-flight check of a data path (the dry run): it exists, holds data files, none empty.

    Hub ids are not checked (a dry run must work offline). Contents are checked when loaded.
    """
    try:
        if not is_local_source(path):
            return
        _, files = _local_files(Path(path).expanduser())
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    for file in files:
        if Path(file).stat().st_size == 0:
            raise ValueError(f"{key}: data file {file} is empty")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSON lines (the format the loaders read), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_local_rows(path: str, *, split: str = "train"):
    """Rows of a local file or folder: a list of dicts for JSON, a `datasets.Dataset` for parquet."""
    builder, files = _local_files(Path(path).expanduser())
    if builder == "json":
        rows = []
        for file in files:
            rows += read_json_rows(Path(file))
        return rows
    return _read_parquet(files, split=split)


def read_json_rows(path: Path) -> list[dict]:
    """A .json array or JSON-lines file as dicts; an unreadable line becomes a MALFORMED_FIELD row."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix == ".json" and head.startswith(b"["):
        return _read_json_array(path)
    rows = []
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_parse_json_line(line, f"{path} line {line_number}"))
    if not rows:
        raise ValueError(f"data file {path} is empty (no rows)")
    return rows


def _parse_json_line(line: bytes, where: str) -> dict:
    """One JSON-lines row, or a MALFORMED_FIELD row saying `where` and why it is unreadable."""
    try:
        row = parse_json(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {MALFORMED_FIELD: f"{where}: not UTF-8 text"}
    except json.JSONDecodeError as e:
        return {MALFORMED_FIELD: f"{where}: not valid JSON ({e.msg} at column {e.colno})"}
    if not isinstance(row, dict):
        return {MALFORMED_FIELD: f"{where}: a JSON {type(row).__name__}, not an object"}
    if MALFORMED_FIELD in row:
        return {MALFORMED_FIELD: f"{where}: uses the reserved key {MALFORMED_FIELD}"}
    repeated = repeated_key(row)
    if repeated is not None:
        return {MALFORMED_FIELD: key_given_twice(where, repeated)}
    return row


def _read_json_array(path: Path) -> list[dict]:
    """A whole-file JSON array: one syntax error makes the file unreadable, so it is refused whole."""
    try:
        rows = parse_json(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"data file {path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"data file {path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg} "
                         "(a .json file is one array; use .jsonl to let single bad rows be skipped)") from None
    if not rows:
        raise ValueError(f"data file {path} is empty (no rows)")
    if not isinstance(rows, list):
        raise ValueError(f"data file {path}: a JSON {type(rows).__name__}; expected an array of rows or JSON lines")
    return [_array_row(row, f"{path} element {number}") for number, row in enumerate(rows, start=1)]


def _array_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        return {MALFORMED_FIELD: f"{where}: not an object"}
    repeated = repeated_key(row)
    return row if repeated is None else {MALFORMED_FIELD: key_given_twice(where, repeated)}


def _read_parquet(files: list[str], *, split: str):
    """Parquet files through `datasets`; an unreadable or empty file is named."""
    import pyarrow
    import pyarrow.parquet as pq
    from datasets import load_dataset

    for file in files:
        try:
            num_rows = pq.ParquetFile(file).metadata.num_rows
        except (pyarrow.ArrowException, OSError) as e:
            raise ValueError(f"data file {file}: not a readable parquet file ({e})") from None
        if num_rows == 0:
            raise ValueError(f"data file {file} is empty (no rows)")
    try:
        return load_dataset("parquet", data_files={split: files}, split=split)
    except Exception as e:  # datasets wraps arrow errors (e.g. files with different schemas)
        raise ValueError(f"data files {files}: cannot be read together as parquet "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


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
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS and p.is_file())
    else:
        files = [require_file(path, "data source")]
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


def _rename_row_fields(rows: list[dict], source: DataSourceConfig) -> list[dict]:
    """`_rename_to_fields` for a list of dicts; a column counts as present if any readable row has it."""
    columns = set().union(*(row.keys() for row in rows)) - {MALFORMED_FIELD}
    fields = FORMAT_FIELDS[source.format]
    missing = [source.column(f) for f in fields if source.column(f) not in columns and f not in _OPTIONAL_FIELDS]
    if missing and columns:  # no readable row at all: every row is bad, and is reported as such
        raise ValueError(
            f"data source {source.path}: missing column(s) {missing} for format {source.format!r}; "
            f"the data has {sorted(columns)} (map them with `columns`)"
        )
    renamed = []
    for row in rows:
        if MALFORMED_FIELD in row:
            renamed.append(row)
        else:
            renamed.append({field: row.get(source.column(field)) for field in fields})
    return renamed


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
