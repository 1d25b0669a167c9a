"""Logits parity: our megatron Qwen3 vs transformers' Qwen3ForCausalLM, float32 on CPU.

The reference is computed in the test process; each rank builds its own stage from the
HF folder, so this also checks the name mapping, QKV/GQA fusion and TP slicing.
"""

import pytest
import torch

from gazal_nemo.testing.multiproc import run_distributed

SEQ = 24


def _reference(hf_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        return ids, hf(ids).logits


def _megatron_logits(hf_dir, ids, tp, pp):
    """Forward through the pipeline schedule so PP exercises real p2p communication."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.training.model_io import gather_vocab_logits

    init_parallel(tp=tp, pp=pp)
    _, model = qwen3_from_hf(hf_dir, tp=tp, pp=pp)
    model.eval()
    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(batch.shape[1]).unsqueeze(0).expand_as(batch)
        out = model(batch, pos, None)

        def loss_func(logits):
            collected.append(gather_vocab_logits(logits))
            return logits.sum() * 0, {}

        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
        )
    return collected[0] if collected else None


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_logits_match_transformers(tiny_hf_dir_tied, tiny_hf_dir, tp, pp):
    hf_dir = tiny_hf_dir_tied if pp > 1 else tiny_hf_dir
    ids, ref = _reference(hf_dir)
    results = run_distributed(_megatron_logits, tp * pp, str(hf_dir), ids, tp, pp)
    outputs = [r for r in results if r is not None]
    assert outputs, "no rank produced logits"
    for logits in outputs:
        assert logits.shape == ref.shape
        err = (logits - ref).abs().max().item()
        assert err < 1e-4, f"tp={tp} pp={pp}: max abs diff {err}"
    assert ref.abs().max() > 1.0  # the comparison is over real signal, not near-zero logits


def test_yarn_rope_scaling_matches_transformers(tmp_path):
    """YaRN (factor 4 over 64 original positions), checked past the original context."""
    from gazal_nemo.testing.tiny import make_tiny_qwen3

    hf_dir = make_tiny_qwen3(tmp_path / "yarn", seed=3, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    logits = run_distributed(_megatron_logits, 1, str(hf_dir), ids, 1, 1)[0]
    assert (logits - ref).abs().max().item() < 1e-4
