"""A corpus of broken inputs, each run through the real CLI in a subprocess (issue 8).

Every row builds one broken input in its own folder and runs `python -m gazal_nemo.cli ...`
on it. A row passes when the command exits 2 with no traceback, its `gazal <cmd>: error:`
line names what is wrong (the file, line, key or tensor: the row's fragments), and nothing
that looks complete was written (the row's `outputs` do not exist, no staging folder is
left). Rows use `--dry-run` or the cheapest command that reaches their check; they run in
a small process pool once per session, and each row is still its own test.

To add a row: write `def _my_case(tmp: Path, base: Base) -> list[str]` that builds the input
under `tmp` and returns the CLI arguments, then add `Case("my-case", _my_case, ["fragment"])`
to CASES. Fragments may use `{tmp}`. Two cases do not fit a table (they kill a converter
mid-write) and are the tests at the end.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from gazal_nemo.testing.tiny import write_jsonl

REPO = Path(__file__).resolve().parents[2]
SFT_RECIPE = REPO / "recipes" / "tiny_cpu_sft.yaml"
GRPO_RECIPE = REPO / "recipes" / "tiny_cpu_grpo.yaml"
NUM_WORKERS = 3  # interpreter start dominates; three overlap well on two cores
ROW_TIMEOUT_S = 240


@dataclass(frozen=True)
class Base:
    """Good inputs shared by every row (read-only: a row that breaks one copies it first)."""

    hf_dir: Path
    ckpt_dir: Path


@dataclass(frozen=True)
class Case:
    """One broken input: how to build it, and what the error line must name."""

    name: str
    build: Callable[[Path, Base], list[str]]
    fragments: list[str]
    outputs: list[str] = field(default_factory=lambda: ["run", "out"])
    """Paths under the row's folder that must not exist afterwards (nothing complete-looking)."""


# ---- good inputs and command lines -------------------------------------------------------


def _medreason_rows(num_rows: int) -> list[dict]:
    return [{"question": f"Patient {i} has chest pain. Diagnosis?", "options": ["STEMI", "NSTEMI"],
             "answer": "A", "reasoning": f"ST elevation in {i}."} for i in range(num_rows)]


def _mcq_rows(num_rows: int) -> list[dict]:
    from gazal_nemo.tasks.mcq import make_synthetic_mcq_rows

    return make_synthetic_mcq_rows(num_rows, seed=0)


def _outputs(tmp: Path) -> list[str]:
    return [f"checkpoint.dir={tmp}/run/checkpoints", f"logging.dir={tmp}/run/logs", f"export_dir={tmp}/run/export"]


def sft_command(tmp: Path, base: Base, *overrides: str, data: Path | None = None, dry_run: bool = True,
                hf_dir: Path | None = None) -> list[str]:
    """`gazal sft` on the tiny recipe with good data, model and outputs unless overridden."""
    data = data if data is not None else write_jsonl(tmp / "sft.jsonl", _medreason_rows(8))
    return (["sft", "--recipe", str(SFT_RECIPE)] + (["--dry-run"] if dry_run else [])
            + [f"model.hf_path={hf_dir or base.hf_dir}", f"sft_data.sources.0.path={data}", *_outputs(tmp),
               *overrides])


def grpo_command(tmp: Path, base: Base, *overrides: str, data: Path | None = None, dry_run: bool = True) -> list[str]:
    data = data if data is not None else write_jsonl(tmp / "mcq.jsonl", _mcq_rows(8))
    return (["grpo", "--recipe", str(GRPO_RECIPE)] + (["--dry-run"] if dry_run else [])
            + [f"model.hf_path={base.hf_dir}", f"grpo.data.path={data}", *_outputs(tmp), *overrides])


def to_megatron_command(tmp: Path, hf_dir: Path, *flags: str) -> list[str]:
    return ["convert", "hf-to-megatron", "--hf-dir", str(hf_dir), "--out", str(tmp / "out"), "--quiet", *flags]


def to_hf_command(tmp: Path, ckpt_dir: Path, *flags: str) -> list[str]:
    return ["convert", "megatron-to-hf", "--ckpt-dir", str(ckpt_dir), "--out", str(tmp / "out"), "--quiet", *flags]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _jsonl_with_bad_lines(path: Path, rows: list[dict], bad: dict[int, bytes]) -> Path:
    """JSON lines where line i (1-based) is replaced by bad[i]."""
    lines = [json.dumps(row).encode() for row in rows]
    for line_number, text in bad.items():
        lines[line_number - 1] = text
    return _write_bytes(path, b"\n".join(lines) + b"\n")


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _symlink_loop(path: Path) -> Path:
    os.symlink(path.name, path)  # points at itself
    return path


# ---- data --------------------------------------------------------------------------------


def _sft_malformed_lines(tmp, base):
    # 2 of 8 lines broken: over the recipe's max_bad_fraction (0.05); counted, file and line named.
    data = _jsonl_with_bad_lines(tmp / "sft.jsonl", _medreason_rows(8), {3: b'{"question": "cut', 6: b"[1, 2]"})
    return sft_command(tmp, base, data=data, dry_run=False)


def _mcq_malformed_lines(tmp, base):
    data = _jsonl_with_bad_lines(tmp / "mcq.jsonl", _mcq_rows(8), {2: b"{nope", 5: b"{nope"})
    return grpo_command(tmp, base, data=data, dry_run=False)


def _sft_not_utf8(tmp, base):
    data = _write_bytes(tmp / "sft.jsonl", b"\xff\xfe\x00binary\n" * 4)
    return sft_command(tmp, base, data=data, dry_run=False)


def _sft_json_array_syntax_error(tmp, base):
    data = _write_bytes(tmp / "sft.json", json.dumps(_medreason_rows(3), indent=1).encode()[:-20])
    return sft_command(tmp, base, data=data, dry_run=False)


def _sft_parquet_wrong_columns(tmp, base):
    data = _write_parquet(tmp / "sft.parquet", [{"prompt": "q", "completion": "a"}] * 4)
    return sft_command(tmp, base, "sft_data.sources.0.format=medreason", data=data, dry_run=False)


def _mcq_parquet_wrong_columns(tmp, base):
    data = _write_parquet(tmp / "mcq.parquet", [{"stem": "q", "choices": "A. x", "key": "A"}] * 4)
    return grpo_command(tmp, base, data=data, dry_run=False)


def _sft_not_parquet(tmp, base):
    data = _write_bytes(tmp / "sft.parquet", b"this is not parquet" * 10)
    return sft_command(tmp, base, data=data, dry_run=False)


def _sft_empty_file(tmp, base):
    return sft_command(tmp, base, data=_write_bytes(tmp / "sft.jsonl", b""))


def _mcq_empty_file(tmp, base):
    return grpo_command(tmp, base, data=_write_bytes(tmp / "mcq.jsonl", b""))


def _sft_blank_lines_only(tmp, base):
    # Passes the dry run's size check; the loader finds no rows and names the file.
    return sft_command(tmp, base, data=_write_bytes(tmp / "sft.jsonl", b"\n\n  \n"), dry_run=False)


def _sft_missing_file(tmp, base):
    return sft_command(tmp, base, data=tmp / "nope.jsonl")


def _mcq_missing_file(tmp, base):
    return grpo_command(tmp, base, data=tmp / "data" / "nope.parquet")


def _sft_folder_without_data(tmp, base):
    (tmp / "data").mkdir()
    (tmp / "data" / "notes.txt").write_text("no data here")
    return sft_command(tmp, base, data=tmp / "data")


def _sft_symlink_loop(tmp, base):
    return sft_command(tmp, base, data=_symlink_loop(tmp / "loop.jsonl"))


def _sft_unsupported_suffix(tmp, base):
    return sft_command(tmp, base, data=_write_bytes(tmp / "sft.csv", b"question,answer\nq,a\n"))


def _json_lines_with_raw(path: Path, rows: list[dict], raw: dict[int, str]) -> Path:
    """JSON lines where line i (1-based) is the raw text raw[i] (JSON that json.dumps cannot write)."""
    lines = [json.dumps(row) for row in rows]
    for line_number, text in raw.items():
        lines[line_number - 1] = text
    return _write_bytes(path, ("\n".join(lines) + "\n").encode())


def _sft_row_key_given_twice(tmp, base):
    # JSON keeps the last "answer": the row would silently train on the other letter.
    twice = ('{"question": "Chest pain. Diagnosis?", "options": ["STEMI", "NSTEMI"], "answer": "A", '
             '"reasoning": "ST elevation.", "answer": "B"}')
    data = _json_lines_with_raw(tmp / "sft.jsonl", _medreason_rows(8), {2: twice})
    return sft_command(tmp, base, data=data, dry_run=False)


def _mcq_option_given_twice(tmp, base):
    # Two "B" options: one is lost and the gold letter would point at another text.
    twice = ('{"question": "Which option is the word pain?", "options": {"A": "chest", "B": "pain", "B": "plan", '
             '"C": "leads"}, "answer": "B"}')
    data = _json_lines_with_raw(tmp / "mcq.jsonl", _mcq_rows(8), {3: twice})
    return grpo_command(tmp, base, data=data, dry_run=False)


# ---- recipes -----------------------------------------------------------------------------


def _recipe_is_a_list(tmp, base):
    return ["sft", "--recipe", str(_write_bytes(tmp / "r.yaml", b"- name: x\n- stage: sft\n")), "--dry-run"]


def _recipe_empty(tmp, base):
    return ["sft", "--recipe", str(_write_bytes(tmp / "r.yaml", b"")), "--dry-run"]


def _recipe_only_comments(tmp, base):
    return ["sft", "--recipe", str(_write_bytes(tmp / "r.yaml", b"# nothing yet\n")), "--dry-run"]


def _recipe_is_a_folder(tmp, base):
    (tmp / "r.yaml").mkdir()
    return ["grpo", "--recipe", str(tmp / "r.yaml"), "--dry-run"]


def _recipe_not_utf8(tmp, base):
    return ["sft", "--recipe", str(_write_bytes(tmp / "r.yaml", b"name: \xff\xfe\n")), "--dry-run"]


def _recipe_symlink_loop(tmp, base):
    return ["sft", "--recipe", str(_symlink_loop(tmp / "r.yaml")), "--dry-run"]


def _recipe_bad_yaml(tmp, base):
    return ["sft", "--recipe", str(_write_bytes(tmp / "r.yaml", b"name: [unclosed\nstage: sft\n")), "--dry-run"]


def _override_bad_yaml(tmp, base):
    return sft_command(tmp, base, "train.max_steps=[1,")


def _model_hub_id_offline(tmp, base):
    return sft_command(tmp, base, "model.hf_path=nobody-here/no-such-model")


# ---- output locations --------------------------------------------------------------------


def _checkpoint_dir_is_a_file(tmp, base):
    _write_bytes(tmp / "ckpt", b"a file")
    return sft_command(tmp, base, f"checkpoint.dir={tmp}/ckpt")


def _logging_dir_under_a_file(tmp, base):
    _write_bytes(tmp / "logs", b"a file")
    return grpo_command(tmp, base, f"logging.dir={tmp}/logs/grpo")


def _export_dir_is_a_file(tmp, base):
    _write_bytes(tmp / "export", b"a file")
    return sft_command(tmp, base, f"export_dir={tmp}/export")


# ---- model folders -----------------------------------------------------------------------


def _model_without_tokenizer(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (hf_dir / name).unlink(missing_ok=True)
    return sft_command(tmp, base, hf_dir=hf_dir)


def _model_without_chat_template(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / "chat_template.jinja").unlink()
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return grpo_command(tmp, base, f"model.hf_path={hf_dir}")


def _model_path_is_a_file(tmp, base):
    return sft_command(tmp, base, hf_dir=_write_bytes(tmp / "model.bin", b"weights"))


def _model_config_garbage(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / "config.json").write_text('{"model_type": "qwen3",')
    return sft_command(tmp, base, hf_dir=hf_dir)


def _convert_model_without_tokenizer(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / "tokenizer.json").unlink()
    return to_megatron_command(tmp, hf_dir)


def _eval_model_without_chat_template(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / "chat_template.jinja").unlink()
    data = write_jsonl(tmp / "medqa.jsonl", [{"question": "Q?", "answer": "c", "answer_idx": "C",
                                              "options": {"A": "a", "B": "b", "C": "c", "D": "d"}}])
    return ["eval", "--model", str(hf_dir), "--benchmarks", "medqa", "--data", str(data), "--out", str(tmp / "out"),
            "--dry-run"]


# ---- converters --------------------------------------------------------------------------

_A_SHARD = "model-00003-of-00012.safetensors"


def _shard_shorter_than_8_bytes(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / _A_SHARD).write_bytes(b"\x01\x02\x03")
    return to_megatron_command(tmp, hf_dir)


def _shard_cut_inside_header(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / _A_SHARD).write_bytes((hf_dir / _A_SHARD).read_bytes()[:40])
    return to_megatron_command(tmp, hf_dir)


def _shard_cut_inside_data(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    data = (hf_dir / _A_SHARD).read_bytes()
    (hf_dir / _A_SHARD).write_bytes(data[: len(data) - 100])
    return to_megatron_command(tmp, hf_dir)


def _index_garbage(tmp, base):
    hf_dir = _copy(base.hf_dir, tmp / "hf")
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return to_megatron_command(tmp, hf_dir)


def _tp_zero(tmp, base):
    return to_megatron_command(tmp, base.hf_dir, "--tp", "0")


def _pp_negative(tmp, base):
    return to_megatron_command(tmp, base.hf_dir, "--pp", "-1")


def _out_under_a_file(tmp, base):
    _write_bytes(tmp / "blocker", b"a file")
    return ["convert", "hf-to-megatron", "--hf-dir", str(base.hf_dir), "--out", str(tmp / "blocker" / "out")]


def _distcp_missing(tmp, base):
    ckpt = _copy(base.ckpt_dir, tmp / "ckpt")
    (ckpt / "__0_5.distcp").unlink()
    return to_hf_command(tmp, ckpt)


def _distcp_truncated(tmp, base):
    ckpt = _copy(base.ckpt_dir, tmp / "ckpt")
    data = (ckpt / "__0_5.distcp").read_bytes()
    (ckpt / "__0_5.distcp").write_bytes(data[: len(data) // 2])
    return to_hf_command(tmp, ckpt)


def _dist_metadata_garbage(tmp, base):
    ckpt = _copy(base.ckpt_dir, tmp / "ckpt")
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    return to_hf_command(tmp, ckpt)


def _checkpoint_info_garbage(tmp, base):
    ckpt = _copy(base.ckpt_dir, tmp / "ckpt")
    (ckpt / "gazal_checkpoint.json").write_text('{"format": ')
    return to_hf_command(tmp, ckpt)


def _checkpoint_hf_folder_without_tokenizer(tmp, base):
    ckpt = _copy(base.ckpt_dir, tmp / "ckpt")
    (ckpt / "hf" / "tokenizer.json").unlink()
    return to_hf_command(tmp, ckpt)


# ---- step checkpoints (training/checkpoint.py) -------------------------------------------


def _damaged_step(tmp: Path, *, trainer_state: bytes = b'{"step": 2, "world_si', manifest: dict | None = None) -> Path:
    """checkpoint.dir with one step folder whose trainer state or manifest is damaged."""
    step = tmp / "ckpt" / "step_000002"
    _write_bytes(step / "trainer_state.json", trainer_state)
    _write_bytes(step / "manifest.json", json.dumps(manifest or {"format_version": 2, "files": {}}).encode())
    return step


def _step_trainer_state_garbage(tmp, base):
    return to_hf_command(tmp, _damaged_step(tmp))


def _step_file_truncated(tmp, base):
    step = _damaged_step(tmp, trainer_state=json.dumps({"step": 2, "world_size": 1}).encode(),
                         manifest={"format_version": 2, "files": {"__0_0.distcp": 4096, "trainer_state.json": 34}})
    _write_bytes(step / "__0_0.distcp", b"cut")
    return to_hf_command(tmp, step)


def _root_without_complete_step(tmp, base):
    _damaged_step(tmp)
    return to_hf_command(tmp, tmp / "ckpt")


def _resume_with_only_a_damaged_checkpoint(tmp, base):
    _damaged_step(tmp)
    return sft_command(tmp, base, f"checkpoint.dir={tmp}/ckpt", "train.max_steps=2", dry_run=False)


CASES = [
    # data
    Case("sft-malformed-jsonl-lines", _sft_malformed_lines,
         ["2 of 8 rows are bad", "first: row 3 of {tmp}/sft.jsonl", "{tmp}/sft.jsonl line 3"]),  # rows count from 1
    Case("mcq-malformed-jsonl-lines", _mcq_malformed_lines,
         ["2 of 8 rows are bad", "first: row 2: malformed line: {tmp}/mcq.jsonl line 2"]),
    Case("sft-row-key-given-twice", _sft_row_key_given_twice,
         ["1 of 8 rows are bad", "first: row 2 of {tmp}/sft.jsonl", "{tmp}/sft.jsonl line 2: key 'answer' is given twice"]),
    Case("mcq-option-given-twice", _mcq_option_given_twice,
         ["1 of 8 rows are bad", "first: row 3: malformed line: {tmp}/mcq.jsonl line 3: key 'options.B' is given twice"]),
    Case("sft-not-utf8", _sft_not_utf8, ["{tmp}/sft.jsonl line 1: not UTF-8"]),
    Case("sft-json-array-syntax-error", _sft_json_array_syntax_error, ["{tmp}/sft.json: not valid JSON at line"]),
    Case("sft-parquet-wrong-columns", _sft_parquet_wrong_columns, ["{tmp}/sft.parquet", "missing column(s)"]),
    Case("mcq-parquet-wrong-columns", _mcq_parquet_wrong_columns, ["data.question_key='question'", "mcq.parquet"]),
    Case("sft-not-parquet", _sft_not_parquet, ["{tmp}/sft.parquet: not a readable parquet file"]),
    Case("sft-empty-file", _sft_empty_file, ["sft_data.sources[0].path", "{tmp}/sft.jsonl is empty"]),
    Case("mcq-empty-file", _mcq_empty_file, ["grpo.data.path", "{tmp}/mcq.jsonl is empty"]),
    Case("sft-blank-lines-only", _sft_blank_lines_only, ["{tmp}/sft.jsonl is empty"]),
    Case("sft-missing-file-dry-run", _sft_missing_file, ["sft_data.sources[0].path", "{tmp}/nope.jsonl does not exist"]),
    Case("mcq-missing-file-dry-run", _mcq_missing_file, ["grpo.data.path", "{tmp}/data/nope.parquet does not exist"]),
    Case("sft-folder-without-data", _sft_folder_without_data, ["{tmp}/data: no ['.json', '.jsonl', '.parquet']"]),
    Case("sft-data-symlink-loop", _sft_symlink_loop, ["{tmp}/loop.jsonl: a symlink loop"]),
    Case("sft-unsupported-suffix", _sft_unsupported_suffix, ["{tmp}/sft.csv: unsupported file type"]),
    # recipes
    Case("recipe-is-a-list", _recipe_is_a_list, ["{tmp}/r.yaml: top level must be a mapping", "got a list"]),
    Case("recipe-empty", _recipe_empty, ["recipe {tmp}/r.yaml is empty"]),
    Case("recipe-only-comments", _recipe_only_comments, ["recipe {tmp}/r.yaml is empty"]),
    Case("recipe-is-a-folder", _recipe_is_a_folder, ["recipe {tmp}/r.yaml is a folder, not a file"]),
    Case("recipe-not-utf8", _recipe_not_utf8, ["recipe {tmp}/r.yaml: not UTF-8"]),
    Case("recipe-symlink-loop", _recipe_symlink_loop, ["recipe {tmp}/r.yaml: a symlink loop"]),
    Case("recipe-bad-yaml", _recipe_bad_yaml, ["recipe {tmp}/r.yaml: not valid YAML", "line 1"]),
    Case("override-bad-yaml", _override_bad_yaml, ["override 'train.max_steps=[1,'"]),
    # output locations
    Case("checkpoint-dir-is-a-file", _checkpoint_dir_is_a_file, ["checkpoint.dir='{tmp}/ckpt': is a file"]),
    Case("logging-dir-under-a-file", _logging_dir_under_a_file,
         ["logging.dir='{tmp}/logs/grpo': cannot be created: {tmp}/logs is a file"]),
    Case("export-dir-is-a-file", _export_dir_is_a_file, ["export_dir='{tmp}/export': is a file"]),
    # model folders
    Case("model-without-tokenizer", _model_without_tokenizer, ["model.hf_path", "{tmp}/hf has no tokenizer files"]),
    Case("model-without-chat-template", _model_without_chat_template,
         ["model.hf_path", "{tmp}/hf has no chat template"]),
    Case("model-path-is-a-file", _model_path_is_a_file, ["model.hf_path='{tmp}/model.bin': not a folder"]),
    Case("model-config-garbage", _model_config_garbage, ["{tmp}/hf/config.json: not valid JSON at line 1"]),
    Case("model-hub-id-offline", _model_hub_id_offline,
         ["model.hf_path='nobody-here/no-such-model': no such local folder ({tmp}/nobody-here/no-such-model does not "
          "exist), and as a hub id it could not be fetched"]),
    Case("eval-model-without-chat-template", _eval_model_without_chat_template, ["{tmp}/hf has no chat template"]),
    Case("convert-model-without-tokenizer", _convert_model_without_tokenizer, ["--hf-dir", "{tmp}/hf has no tokenizer"]),
    # converters
    Case("shard-shorter-than-8-bytes", _shard_shorter_than_8_bytes, [f"{{tmp}}/hf/{_A_SHARD}: 3 bytes, too short"]),
    Case("shard-cut-inside-header", _shard_cut_inside_header, [f"{{tmp}}/hf/{_A_SHARD}: cut inside its header"]),
    Case("shard-cut-inside-data", _shard_cut_inside_data, [f"{{tmp}}/hf/{_A_SHARD}: file is shorter than its header"]),
    Case("index-garbage", _index_garbage, ["{tmp}/hf/model.safetensors.index.json: not a valid safetensors index"]),
    Case("tp-zero", _tp_zero, ["argument --tp: --tp=0; must be >= 1"]),
    Case("pp-negative", _pp_negative, ["argument --pp: --pp=-1; must be >= 1"]),
    Case("out-under-a-file", _out_under_a_file, ["--out='{tmp}/blocker/out': cannot be created: {tmp}/blocker is a file"],
         outputs=["blocker/out"]),
    Case("distcp-missing", _distcp_missing, ["{tmp}/ckpt/__0_5.distcp: data file of tensor", "is missing"]),
    Case("distcp-truncated", _distcp_truncated, ["{tmp}/ckpt/__0_5.distcp: truncated"]),
    Case("dist-metadata-garbage", _dist_metadata_garbage, ["{tmp}/ckpt/.metadata: unreadable"]),
    Case("checkpoint-info-garbage", _checkpoint_info_garbage, ["{tmp}/ckpt/gazal_checkpoint.json: not valid JSON"]),
    Case("checkpoint-hf-without-tokenizer", _checkpoint_hf_folder_without_tokenizer,
         ["checkpoint hf/ folder", "{tmp}/ckpt/hf has no tokenizer files"]),
    # step checkpoints (a damaged newest one next to a complete one falls back instead: tests/e2e/test_resume_damaged.py)
    Case("step-trainer-state-garbage", _step_trainer_state_garbage,
         ["{tmp}/ckpt/step_000002/trainer_state.json: not a trainer state"]),
    Case("step-file-truncated", _step_file_truncated, ["{tmp}/ckpt/step_000002", "__0_0.distcp"]),
    Case("checkpoint-root-without-complete-step", _root_without_complete_step,
         ["{tmp}/ckpt: no complete step checkpoint"]),
    Case("resume-with-only-a-damaged-checkpoint", _resume_with_only_a_damaged_checkpoint,
         ["{tmp}/ckpt: no usable checkpoint to resume", "checkpoint.resume=false"]),
]


# ---- running the table -------------------------------------------------------------------


def cli_env(tmp: Path) -> dict:
    """Offline, quiet, and with caches inside the row's folder."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp / ".cache"), "PYTHONUNBUFFERED": "1"}


def _run_case(case: Case, root: Path, base: Base) -> tuple[Path, list[str], subprocess.CompletedProcess]:
    tmp = root / case.name
    tmp.mkdir()
    argv = case.build(tmp, base)
    proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *argv], cwd=tmp, env=cli_env(tmp),
                          capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    return tmp, argv, proc


@pytest.fixture(scope="session")
def base_inputs(tiny_hf_dir, tmp_path_factory) -> Base:
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron

    return Base(hf_dir=Path(tiny_hf_dir), ckpt_dir=convert_hf_to_megatron(tiny_hf_dir, tmp_path_factory.mktemp("c") / "ckpt"))


@pytest.fixture(scope="session")
def corpus_results(request, base_inputs, tmp_path_factory) -> dict[str, concurrent.futures.Future]:
    """Run every selected row once, NUM_WORKERS at a time (so `-k one-row` runs one subprocess)."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)}
    root = tmp_path_factory.mktemp("broken")
    with ThreadPoolExecutor(NUM_WORKERS) as pool:  # a row whose builder fails fails alone, in its own test
        futures = {case.name: pool.submit(_run_case, case, root, base_inputs) for case in CASES if case.name in selected}
        concurrent.futures.wait(futures.values())
    return futures


def _error_line(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.startswith("gazal ") and ": error: " in line), "")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_broken_input_gets_one_error_line(case: Case, corpus_results):
    tmp, argv, proc = corpus_results[case.name].result()
    shown = f"gazal {' '.join(argv)}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, shown
    assert proc.returncode == 2, shown
    line = _error_line(proc.stderr)
    assert line.startswith(f"gazal {argv[0]}"), shown
    for fragment in case.fragments:
        assert fragment.format(tmp=tmp) in line, f"{fragment.format(tmp=tmp)!r} not in the error line\n{shown}"
    for output in case.outputs:
        assert not (tmp / output).exists(), f"{output} was written\n{shown}"
    assert not [p for p in tmp.rglob("*.partial*")], shown


# ---- converters killed mid-write ---------------------------------------------------------


def _start_blocked_converter(tmp: Path, hf_dir: Path) -> tuple[subprocess.Popen, int]:
    """A real converter subprocess that blocks at its first progress line, i.e. mid-write.

    Its stdout is a pipe we fill to the brim before it starts, so the first `converted ...`
    print blocks until we read: the staging folder exists and holds chunks, and nothing
    races the kill. Returns the process and the pipe's read end.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        while True:
            os.write(write_fd, b"x" * 4096)
    except BlockingIOError:
        pass
    try:
        while True:
            os.write(write_fd, b"x")
    except BlockingIOError:
        pass
    os.set_blocking(write_fd, True)
    proc = subprocess.Popen([sys.executable, "-m", "gazal_nemo.cli", *to_megatron_command(tmp, hf_dir)[:-1]],
                            cwd=tmp, env=cli_env(tmp), stdout=write_fd, stderr=subprocess.PIPE, text=True)
    os.close(write_fd)
    return proc, read_fd


def _blocked_in_pipe_write(pid: int) -> bool | None:
    """Whether the process sleeps in a pipe write (/proc wchan); None where the kernel does not say."""
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return None
    return "pipe_write" in wchan if wchan not in ("", "0") else None


def _wait_for_stage_with_chunks(tmp: Path, proc: subprocess.Popen) -> Path:
    """The staging folder, once the converter is blocked at its first progress line (mid-write)."""
    deadline = time.monotonic() + ROW_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        stages = list(tmp.glob(".out.partial-*"))
        if stages and (stages[0] / ".gazal_stage_owner.json").is_file():
            blocked = _blocked_in_pipe_write(proc.pid)
            if blocked is None:
                time.sleep(1.0)  # no wchan: the blocking print comes right after the first chunk
            if blocked is not False:
                return stages[0]
        time.sleep(0.1)
    raise AssertionError(f"converter not blocked mid-write (exit {proc.poll()}): "
                         f"{proc.stderr.read() if proc.poll() is not None else ''}")


def _drain(read_fd: int) -> None:
    os.set_blocking(read_fd, False)
    try:
        while os.read(read_fd, 1 << 16):
            pass
    except BlockingIOError:
        pass


@pytest.mark.slow
def test_kill_9_mid_write_leaves_a_staging_folder_the_next_run_removes(base_inputs, tmp_path):
    proc, read_fd = _start_blocked_converter(tmp_path, base_inputs.hf_dir)
    try:
        stage = _wait_for_stage_with_chunks(tmp_path, proc)
        owner = json.loads((stage / ".gazal_stage_owner.json").read_text())
        assert owner["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        os.close(read_fd)
    assert proc.returncode == -signal.SIGKILL
    assert stage.is_dir() and not (tmp_path / "out").exists()  # what kill -9 leaves behind
    rerun = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *to_megatron_command(tmp_path, base_inputs.hf_dir)],
                           cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr
    assert f"removed {stage}" in rerun.stderr
    assert not stage.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert (tmp_path / "out" / "metadata.json").is_file() and not (tmp_path / "out" / ".gazal_stage_owner.json").exists()


@pytest.mark.slow
def test_ctrl_c_mid_write_prints_one_line_removes_the_staging_folder_and_exits_130(base_inputs, tmp_path):
    proc, read_fd = _start_blocked_converter(tmp_path, base_inputs.hf_dir)
    try:
        stage = _wait_for_stage_with_chunks(tmp_path, proc)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            _drain(read_fd)  # let the interrupted print (and the exit flush) go through
            time.sleep(0.05)
        stderr = proc.stderr.read()
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.kill()
    # 130 from our handler; CPython may instead end the process by re-sending itself SIGINT (as it
    # does for interrupts it counts as unhandled; seen once under heavy load). A shell sees 130 either way.
    assert proc.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "gazal convert: error: interrupted", stderr
    assert sum(": error: " in line for line in stderr.splitlines()) == 1, stderr
    assert not stage.exists() and not (tmp_path / "out").exists()


# ---- in-process checks of the rules the table relies on ----------------------------------


def test_one_malformed_line_is_a_bad_row_under_max_bad_fraction_not_a_refused_file(tmp_path):
    from gazal_nemo.data.config import DataSourceConfig, SFTDataConfig
    from gazal_nemo.data.sft import build_sft_documents
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    path = _jsonl_with_bad_lines(tmp_path / "sft.jsonl", _medreason_rows(100), {5: b'{"question": "cut'})
    cfg = SFTDataConfig(sources=[DataSourceConfig(path=str(path), format="medreason")], system_prompt="S",
                        max_length=256, max_bad_fraction=0.01)
    documents, report = build_sft_documents(cfg, make_tiny_tokenizer(tmp_path / "tok"))
    assert len(documents) == 99 and report.num_bad == 1
    assert report.bad_rows[0].row == 4 and f"{path} line 5: not valid JSON" in report.bad_rows[0].reason
    assert sorted(d.row for d in documents) == [i for i in range(100) if i != 4]  # the rest keep their index


def test_one_malformed_mcq_line_is_a_bad_row(tmp_path):
    from gazal_nemo.tasks.mcq import MCQDataConfig, load_mcq_prompts
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    path = _jsonl_with_bad_lines(tmp_path / "mcq.jsonl", _mcq_rows(50), {7: b"\xff not utf-8"})
    cfg = MCQDataConfig(path=str(path), subset_fraction=1.0, system_prompt="S", max_bad_fraction=0.05)
    prompts, report = load_mcq_prompts(cfg, make_tiny_tokenizer(tmp_path / "tok"))
    assert report.num_bad == 1 and report.bad_rows[0].row == 6 and "line 7: not UTF-8" in report.bad_rows[0].reason
    assert len(prompts) == 49 and 6 not in {p.row for p in prompts}


def _stage_with_owner(parent: Path, name: str, owner: dict | None) -> Path:
    from gazal_nemo.convert.dist_ckpt import STAGE_OWNER_FILE

    stage = parent / f".out.partial-{name}"
    stage.mkdir()
    (stage / "chunk.distcp").write_bytes(b"x" * 10)
    if owner is not None:
        (stage / STAGE_OWNER_FILE).write_text(json.dumps(owner))
    return stage


def test_only_staging_folders_of_dead_local_owners_are_removed(tmp_path):
    import socket

    from gazal_nemo.convert.dist_ckpt import _process_start, remove_stale_stages

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stages = {
        "dead": _stage_with_owner(tmp_path, "dead", {"host": host, "pid": dead.pid, "start": None}),
        "reused-pid": _stage_with_owner(tmp_path, "reused", {"host": host, "pid": os.getpid(), "start": "1"}),
        "live": _stage_with_owner(tmp_path, "live", {"host": host, "pid": os.getpid(),
                                                     "start": _process_start(os.getpid())}),
        "other-host": _stage_with_owner(tmp_path, "remote", {"host": host + "-elsewhere", "pid": dead.pid}),
        "fresh-unowned": _stage_with_owner(tmp_path, "fresh", None),
        "other-output": _stage_with_owner(tmp_path, "x", {"host": host, "pid": dead.pid}).rename(
            tmp_path / ".outer.partial-x"),
    }
    old_unowned = _stage_with_owner(tmp_path, "old", None)
    os.utime(old_unowned, (time.time() - 7200, time.time() - 7200))
    removed = remove_stale_stages(tmp_path / "out")
    assert sorted(removed) == sorted([stages["dead"], stages["reused-pid"], old_unowned])
    assert all(stages[name].exists() for name in ("live", "other-host", "fresh-unowned", "other-output"))


# ---- recipes that mean one thing, and a --dry-run that refuses what the run refuses (issue 15) --
#
# Each row runs the CLI's main() in this process twice, with --dry-run (placed between the
# overrides, as users type it) and without, and requires the same one error line from both:
# every rule lives in the schema or in the checks both paths share (gazal_nemo/recipe.py).
# The dry run goes first; a row whose dry run passes fails before the real run can start.


@dataclass(frozen=True)
class ParityCase:
    """A mistake the dry run and the run must refuse with the same line."""

    name: str
    build: Callable[[Path, Path], list[str]]
    """(row folder, tiny HF model folder) -> CLI arguments without --dry-run."""
    fragments: list[str]
    env: dict[str, str] = field(default_factory=dict)
    in_row_folder: bool = False
    """Run with the row's folder as the working directory (relative paths)."""
    known_gap: str | None = None
    """Why the row fails today (a strict xfail: it fails the suite once the gap is closed, so the mark goes)."""


def _tiny_sft(tmp: Path, hf_dir: Path, *overrides: str, recipe: Path = SFT_RECIPE) -> list[str]:
    data = write_jsonl(tmp / "sft.jsonl", _medreason_rows(8))
    return ["sft", "--recipe", str(recipe), f"model.hf_path={hf_dir}", f"sft_data.sources.0.path={data}",
            *_outputs(tmp), *overrides]


def _tiny_grpo(tmp: Path, hf_dir: Path, *overrides: str) -> list[str]:
    data = write_jsonl(tmp / "mcq.jsonl", _mcq_rows(8))
    return ["grpo", "--recipe", str(GRPO_RECIPE), f"model.hf_path={hf_dir}", f"grpo.data.path={data}",
            *_outputs(tmp), *overrides]


def _tiny_eval(tmp: Path, hf_dir: Path, data: Path, *flags: str) -> list[str]:
    return ["eval", "--model", str(hf_dir), "--benchmarks", "medqa", "--data", str(data), "--out",
            str(tmp / "out"), *flags]


def _medqa_rows(num_rows: int) -> list[dict]:
    return [{"question": f"Q{i}?", "answer": "c", "answer_idx": "C", "options": {"A": "a", "B": "b", "C": "c"}}
            for i in range(num_rows)]


def _with_sft_recipe_text(tmp: Path, edit: Callable[[str], str]) -> Path:
    path = tmp / "recipe.yaml"
    path.write_text(edit(SFT_RECIPE.read_text()))
    return path


def _line_of(text: str, line_start: str, occurrence: int = 1) -> int:
    numbers = [number for number, line in enumerate(text.splitlines(), 1) if line.startswith(line_start)]
    return numbers[occurrence - 1]


_SFT_TEXT = SFT_RECIPE.read_text()
_OPTIM_LINE = _line_of(_SFT_TEXT, "optim:")
_SEED_LINE = _line_of(_SFT_TEXT, "  seed: 3407")  # train.seed (sft_data.seed comes later)
_NUM_SFT_LINES = len(_SFT_TEXT.splitlines())


def _model_copy(tmp: Path, hf_dir: Path, **config_changes) -> Path:
    model = _copy(hf_dir, tmp / "hf")
    config = json.loads((model / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (model / "config.json").write_text(json.dumps(config))
    return model


def _missing_local_folder(tmp, hf_dir):
    (tmp / "runs").mkdir()  # `runs/sft-export` with a runs/ folder here is a local path that is missing
    return _tiny_sft(tmp, hf_dir, "model.hf_path=runs/sft-export")


def _prompts_over_two_ranks(tmp, hf_dir):
    return _tiny_grpo(tmp, hf_dir, "grpo.prompts_per_step=3", "train.global_batch_size=12", "train.micro_batch_size=2")


def _eval_row_key_given_twice(tmp, hf_dir):
    lines = [json.dumps(row) for row in _medqa_rows(3)]
    lines[1] = '{"question": "Q1?", "answer": "c", "answer_idx": "C", "answer_idx": "A", "options": {"A": "a", "B": "b", "C": "c"}}'
    return _tiny_eval(tmp, hf_dir, _write_bytes(tmp / "medqa.jsonl", ("\n".join(lines) + "\n").encode()))


def _eval_settings_garbage(tmp, hf_dir):
    _write_bytes(tmp / "out" / "eval_settings.json", b'{"model": ')
    return _tiny_eval(tmp, hf_dir, write_jsonl(tmp / "medqa.jsonl", _medqa_rows(3)))


PARITY_CASES = [
    # recipes that mean two things
    ParityCase("recipe-section-given-twice",
               lambda tmp, hf: _tiny_sft(tmp, hf, recipe=_with_sft_recipe_text(tmp, lambda t: t + "optim: {lr: 1.0}\n")),
               [f"optim is given twice (line {_OPTIM_LINE} and line {_NUM_SFT_LINES + 1})", "{tmp}/recipe.yaml"]),
    ParityCase("recipe-key-given-twice",
               lambda tmp, hf: _tiny_sft(tmp, hf, recipe=_with_sft_recipe_text(
                   tmp, lambda t: t.replace("  seed: 3407\n", "  seed: 3407\n  seed: 1\n", 1))),
               [f"train.seed is given twice (line {_SEED_LINE} and line {_SEED_LINE + 1})"]),
    # run lengths that would train nothing
    ParityCase("max-steps-zero", lambda tmp, hf: _tiny_sft(tmp, hf, "train.max_steps=0"),
               ["train.max_steps=0; allowed: null or integers >= 1"]),
    ParityCase("max-steps-negative", lambda tmp, hf: _tiny_sft(tmp, hf, "train.max_steps=-1"),
               ["train.max_steps=-1; allowed: null or integers >= 1"]),
    ParityCase("epochs-zero", lambda tmp, hf: _tiny_grpo(tmp, hf, "train.epochs=0"), ["train.epochs=0; allowed: integers >= 1"]),
    ParityCase("stop-at-step-zero", lambda tmp, hf: _tiny_sft(tmp, hf, "train.stop_at_step=0"),
               ["train.stop_at_step=0; allowed: null or integers >= 1"]),
    ParityCase("save-every-negative", lambda tmp, hf: _tiny_sft(tmp, hf, "checkpoint.save_every=-1"),
               ["checkpoint.save_every=-1; allowed: integers >= 0"]),
    ParityCase("log-every-zero", lambda tmp, hf: _tiny_grpo(tmp, hf, "logging.log_every=0"),
               ["logging.log_every=0; allowed: integers >= 1"]),
    # numbers that are not finite
    ParityCase("lr-infinite", lambda tmp, hf: _tiny_sft(tmp, hf, "optim.lr=.inf"), ["optim.lr=inf; allowed: a finite number"]),
    ParityCase("eps-high-nan", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.loss.eps_high=.nan"),
               ["grpo.loss.eps_high=nan; allowed: a finite number"]),
    # rules that compare two keys (they lived in the stages, out of the dry run's sight)
    ParityCase("max-length-vs-seq-length", lambda tmp, hf: _tiny_sft(tmp, hf, "sft_data.max_length=128"),
               ["sft_data.max_length=128 must equal train.seq_length=256"]),
    ParityCase("train-adapter-without-adapter", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.train_adapter=true"),
               ["grpo.train_adapter=true but the recipe has no adapter section"]),
    ParityCase("prompts-per-step-vs-data-parallel", _prompts_over_two_ranks,
               ["grpo.prompts_per_step=3 must divide by the data-parallel size 2"], env={"WORLD_SIZE": "2", "RANK": "0"}),
    ParityCase("grpo-with-pipeline-parallel", lambda tmp, hf: _tiny_grpo(tmp, hf, "parallel.pp=2"),
               ["parallel.pp=2 with stage grpo"], env={"WORLD_SIZE": "2", "RANK": "0"}),
    ParityCase("reward-plugin-missing",
               lambda tmp, hf: _tiny_grpo(tmp, hf, 'grpo.rewards.plugins={"no_such_pkg.mod:fn": 1.0}'),
               ["grpo.rewards.plugins: cannot import module 'no_such_pkg.mod'"]),
    # errors name the key as the recipe writes it
    ParityCase("eps-low-full-key", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.loss.eps_low=2"),
               ["grpo.loss.eps_low=2.0; allowed: 0 <= x < 1"]),
    ParityCase("sampling-full-key", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.sampling.top_p=1.5"),
               ["grpo.sampling.top_p=1.5"]),
    ParityCase("rewards-full-key", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.rewards.cosine_max_length=0"),
               ["grpo.rewards.cosine_max_length=0"]),
    ParityCase("data-full-key", lambda tmp, hf: _tiny_grpo(tmp, hf, "grpo.data.subset_fraction=0"),
               ["grpo.data.subset_fraction=0.0"]),
    ParityCase("source-full-key", lambda tmp, hf: _tiny_sft(tmp, hf, "sft_data.sources.0.weight=0"),
               ["sft_data.sources[0].weight=0.0; allowed: finite numbers > 0"]),
    # model folders
    ParityCase("missing-local-folder-taken-for-a-hub-id", _missing_local_folder,
               ["model.hf_path='runs/sft-export': no such folder: {tmp}/runs/sft-export does not exist"],
               in_row_folder=True),
    ParityCase("sft-vocab-smaller-than-tokenizer",
               lambda tmp, hf: _tiny_sft(tmp, hf, f"model.hf_path={_model_copy(tmp, hf, vocab_size=300)}"),
               ["model.hf_path", "{tmp}/hf/config.json has vocab_size=300, smaller than its tokenizer"]),
    ParityCase("grpo-vocab-smaller-than-tokenizer",
               lambda tmp, hf: _tiny_grpo(tmp, hf, f"model.hf_path={_model_copy(tmp, hf, vocab_size=300)}"),
               ["{tmp}/hf/config.json has vocab_size=300, smaller than its tokenizer"]),
    ParityCase("eval-vocab-smaller-than-tokenizer",
               lambda tmp, hf: _tiny_eval(tmp, _model_copy(tmp, hf, vocab_size=300),
                                          write_jsonl(tmp / "medqa.jsonl", _medqa_rows(3))),
               ["{tmp}/hf/config.json has vocab_size=300, smaller than its tokenizer"]),
    ParityCase("config-without-head-dim",
               lambda tmp, hf: _tiny_sft(tmp, hf, f"model.hf_path={_model_copy(tmp, hf, head_dim=None)}"),
               ["{tmp}/hf/config.json: no head_dim; transformers reads that as 128, but hidden_size / "
                "num_attention_heads = 64 / 4 = 16"]),
    # data rows and eval folders
    ParityCase("eval-row-key-given-twice", _eval_row_key_given_twice,
               ["1 of 3 rows are bad", "first: row 2: malformed row: {tmp}/medqa.jsonl line 2: key 'answer_idx' is given twice"]),
    ParityCase("eval-settings-garbage", _eval_settings_garbage, ["{tmp}/out/eval_settings.json"]),
]


def _with_dry_run(argv: list[str]) -> list[str]:
    """--dry-run between the overrides of a stage command (after the first), else at the end."""
    if argv[0] in ("sft", "grpo"):
        return argv[:4] + ["--dry-run"] + argv[4:]
    return [*argv, "--dry-run"]


@pytest.mark.parametrize("case", [
    pytest.param(case, id=case.name,
                 marks=[pytest.mark.xfail(strict=True, reason=case.known_gap)] if case.known_gap else [])
    for case in PARITY_CASES])
def test_dry_run_refuses_what_the_run_refuses(case: ParityCase, tiny_hf_dir, tmp_path, monkeypatch, capsys):
    from gazal_nemo.cli import main

    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.in_row_folder:
        monkeypatch.chdir(tmp_path)
    argv = case.build(tmp_path, Path(tiny_hf_dir))
    lines = {}
    for mode, args in (("dry run", _with_dry_run(argv)), ("run", argv)):
        code = main(args)
        captured = capsys.readouterr()
        shown = f"{mode}: gazal {' '.join(args)}\nstdout:\n{captured.out[-2000:]}\nstderr:\n{captured.err[-3000:]}"
        assert code == 2 and "Traceback" not in captured.err, shown
        lines[mode] = _error_line(captured.err)
        for fragment in case.fragments:
            assert fragment.format(tmp=tmp_path) in lines[mode], f"{fragment.format(tmp=tmp_path)!r} not in\n{shown}"
    assert lines["dry run"] == lines["run"]
    assert not (tmp_path / "run").exists()


def test_dry_run_between_overrides_applies_the_later_ones(tiny_hf_dir, tmp_path, capsys):
    from gazal_nemo.cli import main

    argv = _with_dry_run(_tiny_sft(tmp_path, Path(tiny_hf_dir), "train.max_steps=7", "optim.lr=0.5"))
    assert argv.index("--dry-run") < argv.index("train.max_steps=7")
    assert main(argv) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)  # the dry run prints the validated recipe as YAML
    assert printed["train"]["max_steps"] == 7 and printed["optim"]["lr"] == 0.5
    with pytest.raises(SystemExit) as exited:  # an unknown flag among the overrides is still refused
        main([*argv, "--dryrun"])
    assert exited.value.code == 2 and "unrecognized arguments: --dryrun" in capsys.readouterr().err


def test_plan_of_a_qwen3_hub_id_works_offline(tmp_path):
    """`gazal plan` on a hub id reads the shipped published config: offline, with an empty HF cache,
    it prints the same plan as for a local folder holding that config.json."""
    from gazal_nemo.models.qwen3_configs import PUBLISHED_QWEN3_CONFIGS

    recipe = REPO / "recipes" / "grpo_qwen3_32b.yaml"
    env = {**cli_env(tmp_path), "HF_HOME": str(tmp_path / "empty_hf_home")}
    local = tmp_path / "qwen3_32b"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(PUBLISHED_QWEN3_CONFIGS["Qwen/Qwen3-32B"]))
    script = ("import sys\nfrom gazal_nemo.cli import main\n"
              "for model in sys.argv[1:]:\n"
              f"    code = main(['plan', '--recipe', {str(recipe)!r}, '--te', 'on', 'model.hf_path=' + model])\n"
              "    print(f'=== exit {code}', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", script, "Qwen/Qwen3-32B", str(local)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=ROW_TIMEOUT_S)
    assert "Traceback" not in proc.stderr and proc.returncode == 0, proc.stderr
    hub, hub_code, folder, folder_code, _ = re.split(r"=== exit (\d+)\n", proc.stdout)
    assert hub_code == folder_code and hub_code in ("0", "1"), proc.stdout + proc.stderr  # a verdict, not an error
    assert hub.strip() and hub == folder.replace(str(local), "Qwen/Qwen3-32B"), proc.stdout
    assert not (tmp_path / "empty_hf_home").exists()  # nothing was looked up


def test_reports_count_rows_from_one(tmp_path):
    """The SFT, MCQ and benchmark loaders name the same broken line 3 as row 3."""
    from gazal_nemo.data.config import DataSourceConfig, SFTDataConfig
    from gazal_nemo.data.sft import build_sft_documents
    from gazal_nemo.eval.loaders import load_benchmark
    from gazal_nemo.tasks.mcq import MCQDataConfig, load_mcq_prompts
    from gazal_nemo.testing.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(tmp_path / "tok")
    sft = _jsonl_with_bad_lines(tmp_path / "sft.jsonl", _medreason_rows(20), {3: b"{cut"})
    _, report = build_sft_documents(SFTDataConfig(sources=[DataSourceConfig(path=str(sft), format="medreason")],
                                                  system_prompt="S", max_length=256, max_bad_fraction=0.5), tokenizer)
    assert f"bad row 3 of {sft}: malformed line: {sft} line 3" in report.summary()
    mcq = _jsonl_with_bad_lines(tmp_path / "mcq.jsonl", _mcq_rows(20), {3: b"{cut"})
    _, report = load_mcq_prompts(MCQDataConfig(path=str(mcq), subset_fraction=1.0, system_prompt="S",
                                               max_bad_fraction=0.5), tokenizer)
    assert f"bad row 3: malformed line: {mcq} line 3" in report.summary()
    rows = _medqa_rows(20)
    rows[2]["answer_idx"] = "Z"
    _, report = load_benchmark("medqa", str(write_jsonl(tmp_path / "medqa.jsonl", rows)), max_bad_fraction=0.5)
    assert "bad row 3: answer" in report.summary()


def test_a_json_array_element_with_a_key_given_twice_is_a_bad_row(tmp_path):
    from gazal_nemo.data.sources import MALFORMED_FIELD, read_json_rows

    text = ('[{"question": "a", "answer": "A"},\n'
            ' {"question": "b", "options": {"A": "x", "A": "y"}, "answer": "A"},\n'
            ' {"question": "c", "answer": "A", "nested": [{"k": 1, "k": 2}]}]')
    rows = read_json_rows(_write_bytes(tmp_path / "rows.json", text.encode()))
    assert rows[0] == {"question": "a", "answer": "A"}
    assert rows[1] == {MALFORMED_FIELD: f"{tmp_path}/rows.json element 2: key 'options.A' is given twice "
                                        "(JSON keeps only the last value)"}
    assert "element 3: key 'nested.0.k' is given twice" in rows[2][MALFORMED_FIELD]


def test_authors_pubmedqa_file_with_a_pmid_given_twice_is_a_bad_row(tmp_path):
    from gazal_nemo.eval.loaders import read_rows

    row = '{"QUESTION": "q?", "CONTEXTS": ["c"], "final_decision": "yes"}'
    path = _write_bytes(tmp_path / "ori_pqal.json", f'{{"1": {row}, "2": {row}, "1": {row}}}'.encode())
    rows = read_rows(str(path))
    assert [r.get("_key") for r in rows] == [None, "2"]  # JSON kept one "1"; it is reported, not used
    assert "row 1 (1): key '1' is given twice" in rows[0]["__malformed__"]
