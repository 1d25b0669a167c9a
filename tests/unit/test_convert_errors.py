"""Converters on bad input: every refusal names the key, happens before heavy writes, and a
failed or interrupted conversion leaves no output that looks complete.

Also the single-process round trip HF -> megatron -> HF (with a dtype change and several
output shards), which is what the standalone export path does on a login node.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gazal_nemo.convert.hf_io import HFCheckpointReader
from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron
from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf

REPO = Path(__file__).resolve().parents[2]


def _rewrite_weights(hf_dir: Path, edit) -> Path:
    """Replace a sharded HF folder's weights by one model.safetensors holding edit(tensors)."""
    reader = HFCheckpointReader(hf_dir)
    tensors = {name: reader.get(name) for name in reader.names()}
    for path in list(hf_dir.glob("model*.safetensors*")):
        path.unlink()
    save_file(edit(tensors), hf_dir / "model.safetensors", metadata={"format": "pt"})
    return hf_dir


@pytest.fixture
def hf_copy(tiny_hf_dir, tmp_path):
    return Path(shutil.copytree(tiny_hf_dir, tmp_path / "hf"))


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    return convert_hf_to_megatron(tiny_hf_dir, tmp_path_factory.mktemp("ckpt") / "ckpt")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or ".old" in p.name)


def test_non_qwen3_config_exits_nonzero_naming_model_type(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (hf_copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "converters.hf_to_megatron", "--hf-dir", str(hf_copy),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model_type='llama'" in proc.stderr and "config.json" in proc.stderr
    assert not out.exists()


def test_missing_tensor_is_named(hf_copy, tmp_path):
    _rewrite_weights(hf_copy, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_extra_tensor_is_named(hf_copy, tmp_path):
    _rewrite_weights(hf_copy, lambda t: {**t, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"does not have.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_is_named(hf_copy, tmp_path):
    _rewrite_weights(hf_copy, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)})
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\), "
                                         r"config\.json implies \(32, 64\)"):
        convert_hf_to_megatron(hf_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tied_config_with_a_different_lm_head_is_refused(tiny_hf_dir_tied, tmp_path):
    hf_dir = Path(shutil.copytree(tiny_hf_dir_tied, tmp_path / "hf"))
    _rewrite_weights(hf_dir, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(ValueError, match="'lm_head.weight' differs"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")


def test_single_file_tied_checkpoint_with_a_copied_lm_head_converts(tiny_hf_dir_tied, tmp_path):
    hf_dir = Path(shutil.copytree(tiny_hf_dir_tied, tmp_path / "hf"))
    _rewrite_weights(hf_dir, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    out = convert_megatron_to_hf(convert_hf_to_megatron(hf_dir, tmp_path / "ckpt"), tmp_path / "out")
    original, exported = HFCheckpointReader(tiny_hf_dir_tied), HFCheckpointReader(out)
    assert exported.names() == original.names()  # the redundant head is not exported again
    assert all(torch.equal(exported.get(n), original.get(n)) for n in original.names())


def test_existing_output_is_refused_by_the_cli(tiny_hf_dir, tmp_path, capsys):
    from converters.hf_to_megatron import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    assert main(["--hf-dir", str(tiny_hf_dir), "--out", str(out), "--quiet"]) == 2
    assert f"{out}: output already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["keep.txt"]


@pytest.mark.parametrize("tp,pp,named", [(3, 1, "num_attention_heads=4 not divisible by tp=3"),
                                         (1, 3, "num_hidden_layers=2 not divisible by pp=3")])
def test_impossible_parallel_layout_is_refused(tiny_hf_dir, tmp_path, tp, pp, named):
    with pytest.raises(ValueError, match=named):
        convert_hf_to_megatron(tiny_hf_dir, tmp_path / "out", tp=tp, pp=pp)
    assert not (tmp_path / "out").exists()


class _Interrupt(Exception):
    pass


def _fail_after(count: int):
    seen = []

    def progress(name):
        seen.append(name)
        if len(seen) == count:
            raise _Interrupt(f"stopped after {name}")

    return progress, seen


def test_interrupted_conversion_leaves_no_output(tiny_hf_dir, tmp_path):
    progress, seen = _fail_after(5)
    with pytest.raises(BaseException, match="stopped after"):  # torch wraps it in CheckpointException
        convert_hf_to_megatron(tiny_hf_dir, tmp_path / "out", progress=progress)
    assert len(seen) == 5  # it did fail mid-way, with chunks already written
    assert not (tmp_path / "out").exists()
    assert not _leftovers(tmp_path)


def test_interrupted_overwrite_keeps_the_previous_output(tiny_hf_dir, tmp_path):
    out = convert_hf_to_megatron(tiny_hf_dir, tmp_path / "out")
    before = sorted(os.listdir(out))
    progress, _ = _fail_after(3)
    with pytest.raises(BaseException, match="stopped after"):
        convert_hf_to_megatron(tiny_hf_dir, out, overwrite=True, dtype="bf16", progress=progress)
    assert sorted(os.listdir(out)) == before
    assert json.loads((out / "gazal_checkpoint.json").read_text())["dtype"] == "float32"
    assert not _leftovers(tmp_path)


def test_interrupted_export_leaves_no_output(converted, tmp_path):
    progress, _ = _fail_after(4)
    with pytest.raises(_Interrupt):
        convert_megatron_to_hf(converted, tmp_path / "hf", progress=progress)
    assert not (tmp_path / "hf").exists() and not _leftovers(tmp_path)


def test_single_process_round_trip_in_bf16_with_many_shards(tiny_hf_dir, tmp_path):
    ckpt = convert_hf_to_megatron(tiny_hf_dir, tmp_path / "ckpt", dtype="bf16")
    info = json.loads((ckpt / "gazal_checkpoint.json").read_text())
    assert info["dtype"] == "bfloat16" and info["format_version"] == 1
    assert (ckpt / "hf" / "tokenizer.json").is_file() and (ckpt / "metadata.json").is_file()
    out = convert_megatron_to_hf(ckpt, tmp_path / "hf", max_shard_bytes=40_000)
    original, exported = HFCheckpointReader(tiny_hf_dir), HFCheckpointReader(out)
    assert exported.names() == original.names()
    assert len(set(exported.weight_map.values())) > 3  # several shards, each filled by streaming
    for name in original.names():
        assert torch.equal(exported.get(name), original.get(name).to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _edit_config(ckpt: Path, dst: Path, **changes) -> Path:
    shutil.copytree(ckpt, dst)
    config = json.loads((dst / "hf" / "config.json").read_text())
    config.update(changes)
    (dst / "hf" / "config.json").write_text(json.dumps(config))
    return dst


def test_export_names_a_shape_mismatch(converted, tmp_path):
    ckpt = _edit_config(converted, tmp_path / "ckpt", intermediate_size=96)
    with pytest.raises(ValueError, match=r"'decoder\.layers\.mlp\.linear_fc2\.weight' has shape \(2, 64, 128\), "
                                         r"its hf/config.json implies \(2, 64, 96\)"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_names_an_extra_tensor_unless_told_to_ignore_it(converted, tmp_path):
    ckpt = _edit_config(converted, tmp_path / "ckpt", tie_word_embeddings=True)  # the checkpoint has a head
    with pytest.raises(ValueError, match=r"does not have: \['output_layer\.weight'\].*--ignore-extra-keys"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    out = convert_megatron_to_hf(ckpt, tmp_path / "out", ignore_extra_keys=True)
    assert "lm_head.weight" not in HFCheckpointReader(out).names()


def test_export_names_a_missing_tensor(tiny_hf_dir_tied, tmp_path):
    tied = convert_hf_to_megatron(tiny_hf_dir_tied, tmp_path / "tied")
    ckpt = _edit_config(tied, tmp_path / "ckpt", tie_word_embeddings=False)
    with pytest.raises(ValueError, match=r"missing.*\['output_layer\.weight'\]"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")


def test_export_refuses_a_folder_that_is_not_a_checkpoint(tiny_hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a megatron distributed checkpoint"):
        convert_megatron_to_hf(tiny_hf_dir, tmp_path / "out", hf_meta_dir=tiny_hf_dir)


def test_export_refuses_an_existing_output(converted, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="output already exists"):
        convert_megatron_to_hf(converted, tmp_path / "out")


def test_gazal_convert_subcommand_runs_both_directions(tiny_hf_dir, tmp_path):
    import argparse

    from gazal_nemo.commands import convert

    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert convert.run(parser.parse_args(["hf-to-megatron", "--hf-dir", str(tiny_hf_dir), "--out", str(ckpt),
                                          "--quiet"])) == 0
    assert convert.run(parser.parse_args(["megatron-to-hf", "--ckpt-dir", str(ckpt), "--out", str(out),
                                          "--max-shard-size", "50KB", "--quiet"])) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_parse_size_follows_transformers_spelling():
    from gazal_nemo.commands.convert import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("123") == 123
