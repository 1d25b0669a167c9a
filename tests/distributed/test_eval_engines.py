"""One small evaluation through transformers' generate and through the megatron engine at
TP=1 and TP=2 (real gloo process groups) gives the same completions and extracted answers,
from a HF folder and from the megatron checkpoint converted from it."""

import json

import pytest

from gazal_nemo.testing.multiproc import run_distributed
from gazal_nemo.testing.tiny import write_jsonl

pytestmark = pytest.mark.slow


def _eval(args):
    from gazal_nemo.cli import main

    return main(args)


def _predictions(out):
    return {r["prompt_id"]: (r["completion"], r["extracted"], r["tokens"], r["truncated"])
            for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}


def test_hf_and_megatron_tp1_tp2_agree(tiny_hf_dir, tmp_path):
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron

    rows = [{"question": f"Which option names case {i}?", "options": {"A": "chest", "B": "pain", "C": "plan"},
             "answer_idx": "ABC"[i % 3]} for i in range(5)]
    pubmed = [{"pubid": i, "question": "Does aspirin help?", "context": {"contexts": ["Abstract."]},
               "final_decision": "yes"} for i in range(2)]
    medqa, pubmedqa = write_jsonl(tmp_path / "medqa.jsonl", rows), write_jsonl(tmp_path / "pubmedqa.jsonl", pubmed)
    common = ["eval", "--benchmarks", "medqa,pubmedqa", "--data", f"{medqa},{pubmedqa}", "--max-new-tokens", "12",
              "--batch-size", "4", "--system-prompt", "Answer with \\boxed{X}.", "--keep-reasoning"]
    megatron_ckpt = convert_hf_to_megatron(tiny_hf_dir, tmp_path / "megatron", overwrite=True)

    assert _eval(common + ["--model", str(tiny_hf_dir), "--engine", "hf", "--out", str(tmp_path / "hf")]) == 0
    reference = _predictions(tmp_path / "hf")
    assert len(reference) == 7
    assert run_distributed(_eval, 1, common + ["--model", str(tiny_hf_dir), "--out", str(tmp_path / "tp1")]) == [0]
    assert _predictions(tmp_path / "tp1") == reference
    assert run_distributed(_eval, 2, common + ["--model", str(megatron_ckpt), "--tp", "2",
                                               "--out", str(tmp_path / "tp2")]) == [0, 0]
    assert _predictions(tmp_path / "tp2") == reference


def _make_adapter_and_merged_then_eval(hf_dir, out, eval_args):
    """A DoRA adapter with non-trivial weights as a PEFT folder and its merged megatron checkpoint;
    then `gazal eval` of the adapter folder (in the same process: one start instead of two)."""
    import torch

    from gazal_nemo.convert.dist_ckpt import save_model
    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.peft.config import AdapterConfig
    from gazal_nemo.peft.dora import apply_adapter, merge_adapter
    from gazal_nemo.peft.export import export_peft_adapter
    from gazal_nemo.stages.export import base_linears_in_place

    init_parallel(tp=1)
    shape, model = qwen3_from_hf(hf_dir, tp=1)
    cfg = AdapterConfig(rank=4, alpha=8, dropout=0.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in apply_adapter(model, cfg, shape, seed=0):
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    export_peft_adapter(model, cfg, shape, f"{out}/adapter", base_model_name_or_path=str(hf_dir))
    merge_adapter(model)
    with base_linears_in_place(model):
        save_model(model, f"{out}/merged_megatron", hf_meta_dir=hf_dir, source="test")
    return _eval(eval_args)


def test_peft_adapter_on_megatron_equals_its_merged_export_on_hf(tiny_hf_dir, tmp_path):
    rows = [{"question": f"Which option names case {i}?", "options": {"A": "chest", "B": "pain", "C": "plan"},
             "answer_idx": "A"} for i in range(3)]
    medqa = write_jsonl(tmp_path / "medqa.jsonl", rows)
    common = ["eval", "--benchmarks", "medqa", "--data", str(medqa), "--max-new-tokens", "12",
              "--system-prompt", "Answer with \\boxed{X}.", "--keep-reasoning"]
    # The adapter folder names its base (base_model_name_or_path): no --base needed.
    adapter_eval = common + ["--model", str(tmp_path / "adapter"), "--out", str(tmp_path / "adapter_eval")]
    assert run_distributed(_make_adapter_and_merged_then_eval, 1, str(tiny_hf_dir), str(tmp_path), adapter_eval) == [0]
    assert _eval(common + ["--model", str(tmp_path / "merged_megatron"), "--engine", "hf",
                           "--out", str(tmp_path / "merged_eval")]) == 0
    assert _eval(common + ["--model", str(tiny_hf_dir), "--engine", "hf", "--out", str(tmp_path / "base_eval")]) == 0
    adapted = _predictions(tmp_path / "adapter_eval")
    assert adapted == _predictions(tmp_path / "merged_eval")
    assert adapted != _predictions(tmp_path / "base_eval"), "the adapter changed nothing: the test proves nothing"
