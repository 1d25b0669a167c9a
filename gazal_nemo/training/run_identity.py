"""A run's identity: its id and fingerprints of the files it trains on.

The recipe names the run's inputs by path (data files, the base model), and a path says
nothing about what is in it: a data file rewritten in place, or new weights copied over
`model.hf_path`, leave the recipe unchanged while a resumed run would continue on other data
or put its adapter on another base. So each job fingerprints its inputs once, at start, and
every step checkpoint (`identity.json`) and export (`run_identity.json`) carries them with the
run's id; a resume compares (training/resume_check.py `input_changes`).

A fingerprint is cheap enough for a 64 GB base model: a file's size, its mtime and a SHA-256 of
its bytes, all of them up to FULL_HASH_MAX_BYTES, above that of SAMPLE_BLOCKS blocks spread
evenly over the file (first and last included). A sampled file whose mtime moved counts as
changed (a same-size rewrite may differ only between the samples); a fully hashed one only when
its bytes differ. Hub ids (no local path) are recorded by name and not compared.

The run id is made when a run first takes its checkpoint folder (training/run_folder.py) and
kept by every job of that run: the checkpoints, the folder's gazal_run.json and the logging
folder's copy of it say which run they belong to.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

FULL_HASH_MAX_BYTES = 8 * 2**20
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK_BYTES = 64 * 2**10
IDENTITY_FILE = "identity.json"  # in each step checkpoint
EXPORT_IDENTITY_FILE = "run_identity.json"  # in export_dir
# Files of a model or data folder that can change what is trained (README, LICENSE, ... cannot).
_FINGERPRINTED_SUFFIXES = (".safetensors", ".bin", ".pt", ".distcp", ".json", ".jsonl", ".parquet", ".jinja",
                           ".model", ".txt", ".arrow")
_FINGERPRINTED_NAMES = (".metadata",)  # a megatron dist checkpoint's index


def file_fingerprint(path: Path) -> dict:
    """{size, mtime_ns, sha256 | sampled_sha256} of one file."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= max(FULL_HASH_MAX_BYTES, SAMPLE_BLOCKS * SAMPLE_BLOCK_BYTES):
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
            kind = "sha256"
        else:
            last = stat.st_size - SAMPLE_BLOCK_BYTES
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                digest.update(f.read(SAMPLE_BLOCK_BYTES))
            kind = "sampled_sha256"
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, kind: digest.hexdigest()}


def _fingerprinted_files(folder: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .cache, .git, staging folders
        for name in sorted(files):
            if name.endswith(_FINGERPRINTED_SUFFIXES) or name in _FINGERPRINTED_NAMES:
                found.append(Path(root) / name)
    return found


def path_fingerprint(path: str | Path) -> dict:
    """{path (absolute), files: {name relative to path: fingerprint}} of a file or folder."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return {"path": str(path), "files": {"": file_fingerprint(path)}}  # "": the path itself
    return {"path": str(path), "files": {str(p.relative_to(path)): file_fingerprint(p)
                                         for p in _fingerprinted_files(path)}}


def run_inputs(recipe: dict) -> dict[str, str]:
    """Dotted recipe key -> local path of every file the run trains or evaluates on (hub ids,
    which have no local path, are left out)."""
    inputs = {}
    model = recipe.get("model") or {}
    inputs["model.hf_path"] = model.get("hf_path")
    inputs["model.megatron_ckpt"] = model.get("megatron_ckpt")
    for index, source in enumerate((recipe.get("sft_data") or {}).get("sources") or []):
        inputs[f"sft_data.sources.{index}.path"] = (source or {}).get("path")
    inputs["grpo.data.path"] = ((recipe.get("grpo") or {}).get("data") or {}).get("path")
    evaluation = recipe.get("eval_during_training") or {}
    if evaluation.get("every"):
        inputs["eval_during_training.data"] = evaluation.get("data")
    return {key: str(path) for key, path in inputs.items()
            if path and (Path(str(path)).expanduser().exists())}


def fingerprint_inputs(recipe: dict) -> dict[str, dict]:
    """Dotted key -> path_fingerprint for each local input of the recipe (as a dict)."""
    return {key: path_fingerprint(path) for key, path in run_inputs(recipe).items()}


@dataclass
class RunIdentity:
    """What this job writes into its checkpoints and exports."""

    run_id: str
    inputs: dict = field(default_factory=dict)
    job: dict = field(default_factory=dict)
    """The process that wrote it (ownership.this_process())."""

    def record(self, **extra) -> dict:
        return {"run_id": self.run_id, "written_by": self.job, **extra, "inputs": self.inputs}


_active: RunIdentity | None = None


def set_active_run(identity: RunIdentity | None) -> None:
    """The identity that checkpoints and exports of this process carry (commands/stage.py sets
    it for the length of a stage; None: they carry none, as written by code that calls the
    stage functions directly)."""
    global _active
    _active = identity


def active_run() -> RunIdentity | None:
    return _active
