"""Configuration of the SFT data pipeline (sources, chat rendering, packing).

The defaults reproduce the paper's SFT stage (Appendix A.1 / B.1): the B.1 system prompt,
8192-token sequences, seed 3407. Mistakes raise ValueError naming the key as the recipe
writes it (`sft_data.max_length`, `sft_data.sources[1].weight`) and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from gazal_nemo.data.prompts import SFT_SYSTEM_PROMPT

# Our field names per row format; `columns` maps these to the dataset's own column names.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "medreason": ("question", "options", "answer", "reasoning"),
}
TRUNCATION_POLICIES = ("drop", "truncate")


@dataclass(kw_only=True)
class DataSourceConfig:
    """One SFT data source and how to read its rows."""

    path: str
    """Local .json/.jsonl/.parquet file or folder of them, or a Hugging Face hub dataset id."""
    format: Literal["messages", "medreason"] = "messages"
    """Row format: chat `messages` (role/content list) or MedReason (question, options, answer, reasoning)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Our field name -> the dataset's column name where they differ (unlisted fields keep their name)."""
    weight: float = 1.0
    """Rows drawn per source row: 1.0 uses every row once, 0.5 a seeded half, 2.0 every row twice."""
    split: str = "train"
    """Dataset split to read (hub datasets; local files are read as this one split)."""
    max_rows: int | None = None
    """Read only the first `max_rows` rows of the source (None: all)."""

    KEY_PREFIX: ClassVar[str] = "sft_data.sources[i]"
    """Where a source sits in a recipe; config_io.from_dict puts in the real index."""

    def __post_init__(self):
        key = self.KEY_PREFIX
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"{key}.path={self.path!r}; allowed: a file, folder or hub dataset id")
        if self.format not in FORMAT_FIELDS:
            raise ValueError(f"{key}.format={self.format!r}; allowed: {', '.join(map(repr, FORMAT_FIELDS))}")
        unknown = sorted(set(self.columns) - set(FORMAT_FIELDS[self.format]))
        if unknown:
            raise ValueError(f"{key}.columns has unknown keys {unknown} for format {self.format!r}; "
                             f"allowed keys: {list(FORMAT_FIELDS[self.format])}")
        if not all(isinstance(v, str) and v for v in self.columns.values()):
            raise ValueError(f"{key}.columns: values must be column names, got {self.columns}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"{key}.weight={self.weight!r}; allowed: finite numbers > 0")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"{key}.max_rows={self.max_rows!r}; allowed: null or integers >= 1")

    def column(self, name: str) -> str:
        """The dataset's column holding our field `name`."""
        return self.columns.get(name, name)


@dataclass(kw_only=True)
class SFTDataConfig:
    """The SFT dataset: which sources, how they are rendered, tokenized and packed."""

    sources: list[DataSourceConfig]
    """Data sources mixed into one training set (paper: the synthetic set + MedReason)."""
    system_prompt: str = SFT_SYSTEM_PROMPT
    """System message of every example (paper Appendix B.1); replaces one in the data. "" keeps the data's."""
    max_length: int = 8192
    """Tokens per (packed) training sequence (paper Table 3: max sequence length 8192)."""
    pack: bool = True
    """Pack several documents per sequence (block-diagonal attention) instead of one padded document each."""
    max_bad_fraction: float = 0.01
    """Fail before training when more than this fraction of rows is unusable."""
    seed: int = 3407
    """Seed of source mixing and pack order (paper Table 3: seed 3407)."""
    truncation: Literal["drop", "truncate"] = "drop"
    """Over-long documents: drop them (counted as bad rows) or cut them to max_length."""

    def __post_init__(self):
        if not self.sources:
            raise ValueError("sft_data.sources is empty; allowed: a list of at least one source")
        for index, source in enumerate(self.sources):
            if not isinstance(source, DataSourceConfig):
                raise ValueError(f"sft_data.sources[{index}] must be a DataSourceConfig, got {type(source).__name__}")
        if self.max_length < 2:
            raise ValueError(f"sft_data.max_length={self.max_length}; allowed: integers >= 2 (tokens)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"sft_data.max_bad_fraction={self.max_bad_fraction}; allowed: 0 <= x <= 1")
        if self.seed < 0:
            raise ValueError(f"sft_data.seed={self.seed}; allowed: integers >= 0")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"sft_data.truncation={self.truncation!r}; allowed: {', '.join(map(repr, TRUNCATION_POLICIES))}")
