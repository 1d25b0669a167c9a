"""HF -> megatron dist checkpoint -> live model at TP=2 / PP=2 -> save_model -> HF, with real gloo ranks.

References are transformers' own model on the original folder, built in the test process
(never after init_parallel): bit-identical tensors, identical greedy generations, and
logits within 1e-4 of the model the checkpoint was made from.
"""

from pathlib import Path

import torch

from gazal_nemo.testing.multiproc import run_distributed

SEQ = 16


def _hf_model(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def _reference(hf):
    torch.manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ))
    with torch.no_grad():
        return ids, hf(ids).logits


def _greedy(hf, prompt_ids):
    return hf.generate(prompt_ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)


def _build(ckpt, tp, pp):
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=tp, pp=pp)
    shape = Qwen3Shape.from_pretrained(Path(ckpt) / "hf")
    return build_qwen3(shape, transformer_config(shape, tp=tp, pp=pp))


def _load_at_tp2_forward_and_resave(src_ckpt, dst_ckpt, ids):
    """Rank body: load_model at TP=2, full-vocab logits, then save_model at TP=2."""
    from gazal_nemo.convert.dist_ckpt import load_model, save_model
    from gazal_nemo.training.model_io import gather_vocab_logits

    model = _build(src_ckpt, tp=2, pp=1)
    load_model(model, src_ckpt)
    model.eval()
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        logits = gather_vocab_logits(model(ids, pos, None))
    save_model(model, dst_ckpt, hf_meta_dir=Path(src_ckpt) / "hf", source=str(src_ckpt))
    return logits


def _load_at_pp2_with_plain_megatron_and_forward(ckpt, ids):
    """Rank body: `dist_checkpointing.load(model.sharded_state_dict())` at PP=2, logits via the schedule."""
    from megatron.core import dist_checkpointing
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from gazal_nemo.training.model_io import gather_vocab_logits

    model = _build(ckpt, tp=1, pp=2)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(ckpt)))
    model.eval()
    collected = []

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, torch.arange(batch.shape[1]).unsqueeze(0).expand_as(batch), None)
        return out, lambda logits: (collected.append(gather_vocab_logits(logits)) or logits.sum() * 0, {})

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
        )
    return collected[0] if collected else None


def test_round_trip_through_tp2_training_checkpoint_is_bit_identical(tiny_hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from gazal_nemo.convert.hf_io import HFCheckpointReader
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf

    original_model = _hf_model(tiny_hf_dir)
    ids, ref_logits = _reference(original_model)
    converted = convert_hf_to_megatron(tiny_hf_dir, tmp_path / "from_hf")
    saved = tmp_path / "saved_at_tp2"
    logits = run_distributed(_load_at_tp2_forward_and_resave, 2, str(converted), str(saved), ids)
    for rank_logits in logits:
        assert (rank_logits - ref_logits).abs().max().item() < 1e-4

    exported = convert_megatron_to_hf(saved, tmp_path / "exported", max_shard_bytes=60_000)
    original, back = HFCheckpointReader(tiny_hf_dir), HFCheckpointReader(exported)
    assert back.names() == original.names()
    for name in sorted(original.names()):
        assert torch.equal(back.get(name), original.get(name)), name

    prompt = ids[:, :5]
    assert torch.equal(_greedy(_hf_model(exported), prompt), _greedy(original_model, prompt))
    messages = [{"role": "user", "content": "Which lead shows ST elevation?"}]
    templated = [AutoTokenizer.from_pretrained(d).apply_chat_template(messages, add_generation_prompt=True)
                 for d in (tiny_hf_dir, exported)]
    assert templated[0] == templated[1]


def test_converted_checkpoint_at_pp2_matches_transformers_logits(tiny_hf_dir_tied, tmp_path):
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron

    ids, ref = _reference(_hf_model(tiny_hf_dir_tied))
    ckpt = convert_hf_to_megatron(tiny_hf_dir_tied, tmp_path / "ckpt")
    outputs = [r for r in run_distributed(_load_at_pp2_with_plain_megatron_and_forward, 2, str(ckpt), ids)
               if r is not None]
    assert len(outputs) == 1  # the last stage
    assert (outputs[0] - ref).abs().max().item() < 1e-4
    assert ref.abs().max() > 1.0  # real signal, not near-zero logits


def _load_mismatched(ckpt, model_hf_dir):
    """Rank body: build the model of one config, load a checkpoint of another."""
    from gazal_nemo.convert.dist_ckpt import load_model
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=1, pp=1)
    shape = Qwen3Shape.from_pretrained(model_hf_dir)
    load_model(build_qwen3(shape, transformer_config(shape)), ckpt)


def test_load_model_names_the_tensor_that_does_not_fit(tiny_hf_dir, tiny_hf_dir_tied, tmp_path):
    import pytest

    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron

    ckpt = convert_hf_to_megatron(tiny_hf_dir_tied, tmp_path / "tied_4_layers")
    with pytest.raises(RuntimeError, match=r"ValueError: .*tensor 'decoder\.layers\.[a-z_.]+' has shape \(4, "
                                           r".*model decoder\.layers\.0\..* needs \(2, "):
        run_distributed(_load_mismatched, 1, str(ckpt), str(tiny_hf_dir))
