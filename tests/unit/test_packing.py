"""Sequence packing: layout, labels, masks, and the acceptance test on the real model.

Acceptance: a packed batch run through our megatron Qwen3 (block-diagonal mask, restarted
position ids) gives the same per-token losses as each document run alone through
transformers' Qwen3ForCausalLM. The megatron side runs in its own gloo process (world
size 1); the transformers reference is computed here, before anything initialises
megatron (see the pitfall in tests/distributed).

What this can and cannot see: RoPE is relative, so under a block-diagonal mask restarting
the position ids changes the losses only by rounding; the block mask is what matters here
(the naive forward below is far off). The position-id layout itself is checked by
`test_packed_sample_fields`.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gazal_nemo.data.config import DataSourceConfig, SFTDataConfig
from gazal_nemo.data.packing import (
    IGNORE_INDEX,
    block_causal_attention_mask,
    collate_packed,
    pack_documents,
    pack_sample,
    thd_packed_seq_params,
)
from gazal_nemo.data.sft import build_sft_dataset
from gazal_nemo.testing.multiproc import run_distributed
from gazal_nemo.testing.tiny import write_jsonl

# ---- layout -----------------------------------------------------------------------------


def test_bins_hold_every_document_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=300).tolist()
    bins = pack_documents(lengths, 128, seed=7)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    # Best-fit decreasing lands within a few bins of the ceil(total / capacity) lower bound.
    lower_bound = -(-sum(lengths) // 128)
    assert len(bins) <= lower_bound + 3
    assert pack_documents(lengths, 128, seed=7) == bins
    assert pack_documents(lengths, 128, seed=8) != bins


def test_pack_rejects_documents_longer_than_max_length():
    with pytest.raises(ValueError, match="longer than max_length=4"):
        pack_documents([3, 5], 4, seed=0)


def test_packed_sample_fields():
    doc_a = (np.array([10, 11, 12, 13]), np.array([-100, -100, 12, 13]))
    doc_b = (np.array([20, 21, 22]), np.array([-100, 21, 22]))
    sample = pack_sample([doc_a, doc_b], 10, pad_token_id=0)
    assert sample["input_ids"].tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    # Shifted targets; -100 on each document's last token (13, 22) and on padding.
    assert sample["labels"].tolist() == [-100, 12, 13, -100, 21, 22, -100, -100, -100, -100]
    assert sample["loss_mask"].tolist() == [0, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    assert sample["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert sample["cu_seqlens"].tolist() == [0, 4, 7, 10]


def test_block_causal_mask_matches_a_hand_built_one():
    cu = [torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)]
    mask = block_causal_attention_mask(cu, 5)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    allowed_first = [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert (~mask[0, 0]).int().tolist() == allowed_first
    assert torch.equal(~mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_thd_params_offset_each_sample():
    cu = [torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 6, 8], dtype=torch.int32)]
    params = thd_packed_seq_params(cu, 8)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 3, 8, 14, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_q == 6
    with pytest.raises(ValueError, match="expected the sequence length 9"):
        thd_packed_seq_params(cu, 9)


# ---- acceptance on the real model ---------------------------------------------------------

SEQ = 256


def _packed_batch(tmp_path, hf_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rows = [
        {
            "question": f"Case {i}: chest pain and dyspnea?",
            "options": ["STEMI", "PE", "Angina"],
            "answer": "A. STEMI" if i % 2 else "B. PE",
            "reasoning": " ".join(["Rule out PE."] * (1 + 2 * (i % 3))),
        }
        for i in range(7)
    ]
    write_jsonl(tmp_path / "med.jsonl", rows)
    cfg = SFTDataConfig(
        sources=[DataSourceConfig(path=str(tmp_path / "med.jsonl"), format="medreason")],
        system_prompt="Think first.",
        max_length=SEQ,
    )
    dataset, report = build_sft_dataset(cfg, tokenizer)
    assert report.num_bad == 0
    return collate_packed([dataset[i] for i in range(len(dataset))])


def _per_token_loss(logits_BSV, labels_BS):
    return F.cross_entropy(
        logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels_BS.shape)


def _segments(cu_seqlens, loss_mask_S):
    """(start, end) of each real document (the padding segment has no loss and is skipped)."""
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if loss_mask_S[s:e].any()]


def _hf_one_by_one(hf_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    losses = torch.zeros(batch["labels"].shape)
    with torch.no_grad():
        for b, cu in enumerate(batch["cu_seqlens"]):
            for start, end in _segments(cu, batch["loss_mask"][b]):
                logits = model(batch["input_ids"][b : b + 1, start:end]).logits
                losses[b, start:end] = _per_token_loss(logits, batch["labels"][b : b + 1, start:end])[0]
    return losses


def _megatron_losses(hf_dir, batch):
    """Per-token losses: packed, each document alone, naive (no mask, 0..S-1), and megatron's own loss."""
    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=1)
    _, model = qwen3_from_hf(hf_dir)
    model.eval()
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    mask = block_causal_attention_mask(batch["cu_seqlens"], ids.shape[1])
    with torch.no_grad():
        packed = _per_token_loss(model(ids, positions, mask), labels)
        # megatron's own loss path (vocab-parallel CE) must accept -100 targets: finite, masked later.
        megatron_loss = model(ids, positions, mask, labels=labels)
        naive_positions = torch.arange(ids.shape[1]).expand_as(ids)
        naive = _per_token_loss(model(ids, naive_positions, None), labels)
        alone = torch.zeros(labels.shape)
        for b, cu in enumerate(batch["cu_seqlens"]):
            for start, end in _segments(cu, batch["loss_mask"][b]):
                doc = ids[b : b + 1, start:end]
                logits = model(doc, torch.arange(end - start).unsqueeze(0), None)
                alone[b, start:end] = _per_token_loss(logits, labels[b : b + 1, start:end])[0]
    return packed, alone, naive, megatron_loss


def test_packed_losses_equal_one_by_one(tmp_path, tiny_hf_dir):
    batch = _packed_batch(tmp_path, tiny_hf_dir)
    docs_per_sample = [len(_segments(cu, lm)) for cu, lm in zip(batch["cu_seqlens"], batch["loss_mask"])]
    assert max(docs_per_sample) >= 2, f"fixture did not pack: {docs_per_sample}"
    reference = _hf_one_by_one(tiny_hf_dir, batch)
    [(packed, alone, naive, megatron_loss)] = run_distributed(_megatron_losses, 1, str(tiny_hf_dir), batch)

    loss_mask = batch["loss_mask"].bool()
    assert loss_mask.sum() > 50 and (reference[loss_mask] > 0.1).all()
    assert (packed[~loss_mask] == 0).all()  # prompt and padding positions carry no loss
    torch.testing.assert_close(alone[loss_mask], reference[loss_mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[loss_mask], reference[loss_mask], rtol=1e-4, atol=1e-4)
    assert megatron_loss.shape == packed.shape and torch.isfinite(megatron_loss).all()
    torch.testing.assert_close(megatron_loss[loss_mask], reference[loss_mask], rtol=1e-4, atol=1e-4)

    # Without the mask and restarted positions, later documents would see earlier ones.
    later_docs = torch.zeros_like(loss_mask)
    for b, cu in enumerate(batch["cu_seqlens"]):
        later_docs[b, int(cu[1]) :] = True
    later_docs &= loss_mask
    assert later_docs.any()
    assert (naive[later_docs] - reference[later_docs]).abs().max() > 1e-2
