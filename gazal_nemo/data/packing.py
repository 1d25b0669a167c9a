"""Sequence packing: several tokenized documents per fixed-length training sequence.

Packing keeps 8192-token batches full of real tokens instead of padding. It must not
change what any token sees or predicts, so each packed sample carries:
- `position_ids` restarting at 0 for every document (RoPE sees each document from 0),
- `cu_seqlens`, the document boundaries, from which attention is made block-diagonal
  (torch path: a [B,1,S,S] boolean mask; Transformer Engine path: THD `PackedSeqParams`),
- `labels` already shifted to next-token targets, -100 on each document's last token so no
  loss crosses a boundary, and on prompt and padding tokens; `loss_mask` is labels != -100.
The padding tail (if any) is one more segment in `cu_seqlens`, so `cu_seqlens[-1] == S`
and pad tokens attend only among themselves.

Bins are filled best-fit decreasing (longest document first, into the fullest bin that
still has room), which packs tighter than filling in arrival order; the bins are then
shuffled by the seed so training does not see long documents first. Deterministic.

Shapes: B batch, S sequence length (= max_length), D documents in a sample.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100


def pack_documents(lengths: Sequence[int], max_length: int, *, seed: int) -> list[list[int]]:
    """Group document indices into bins of at most `max_length` tokens (best-fit decreasing, seeded order)."""
    too_long = [i for i, length in enumerate(lengths) if length > max_length]
    if too_long:
        raise ValueError(
            f"documents {too_long[:10]} are longer than max_length={max_length}; "
            f"truncate or drop them before packing"
        )
    bins: list[list[int]] = []
    free = []  # sorted (room_left, bin_index)
    for doc in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[doc], -1))
        if slot < len(free):
            room, bin_index = free.pop(slot)
            bins[bin_index].append(doc)
        else:
            room, bin_index = max_length, len(bins)
            bins.append([doc])
        bisect.insort(free, (room - lengths[doc], bin_index))
    order = np.random.default_rng(seed).permutation(len(bins))
    return [bins[i] for i in order]


def pack_sample(
    documents: Sequence[tuple[np.ndarray, np.ndarray]], max_length: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One packed sample from (input_ids, labels) documents; labels unshifted, -100 = no loss.

    Returns input_ids, labels (shifted), loss_mask, position_ids: [S]; cu_seqlens: [D+1] or
    [D+2] with a padding segment, int32.
    """
    input_ids = np.full(max_length, pad_token_id, dtype=np.int64)
    labels = np.full(max_length, IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros(max_length, dtype=np.int64)
    boundaries = [0]
    for doc_ids, doc_labels in documents:
        start, length = boundaries[-1], len(doc_ids)
        if start + length > max_length:
            raise ValueError(
                f"documents of {sum(len(d) for d, _ in documents)} tokens exceed max_length={max_length}"
            )
        input_ids[start : start + length] = doc_ids
        labels[start : start + length - 1] = doc_labels[1:]  # token t predicts t+1 of the same document
        position_ids[start : start + length] = np.arange(length)
        boundaries.append(start + length)
    if boundaries[-1] < max_length:
        position_ids[boundaries[-1] :] = np.arange(max_length - boundaries[-1])
        boundaries.append(max_length)
    labels_t = torch.from_numpy(labels)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": labels_t,
        "loss_mask": (labels_t != IGNORE_INDEX).float(),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(boundaries, dtype=torch.int32),
    }


class PackedSFTDataset(torch.utils.data.Dataset):
    """Packed samples built on access from tokenized documents and a bin layout."""

    def __init__(self, documents, bins: list[list[int]], *, max_length: int, pad_token_id: int):
        self.documents = documents
        self.bins = bins
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        docs = [(self.documents[i].input_ids, self.documents[i].labels) for i in self.bins[index]]
        return pack_sample(docs, self.max_length, self.pad_token_id)


def collate_packed(samples: list[dict[str, torch.Tensor]]) -> dict:
    """Stack samples into [B, S] tensors; `cu_seqlens` stays a list (one tensor per sample)."""
    batch = {
        key: torch.stack([s[key] for s in samples])
        for key in ("input_ids", "labels", "loss_mask", "position_ids")
    }
    batch["cu_seqlens"] = [s["cu_seqlens"] for s in samples]
    return batch


def segment_ids(cu_seqlens: torch.Tensor, seq_length: int) -> torch.Tensor:
    """[S] index of the segment each position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if int(cu_seqlens[-1]) != seq_length:
        raise ValueError(
            f"cu_seqlens ends at {int(cu_seqlens[-1])}, expected the sequence length {seq_length}"
        )
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def block_causal_attention_mask(cu_seqlens: list[torch.Tensor], seq_length: int) -> torch.Tensor:
    """[B,1,S,S] bool in megatron's convention (True = masked out): causal within each segment only."""
    causal_SS = torch.ones(seq_length, seq_length, dtype=torch.bool).tril()
    masks = []
    for boundaries in cu_seqlens:
        segment_S = segment_ids(boundaries, seq_length)
        same_segment_SS = segment_S[:, None] == segment_S[None, :]
        masks.append(~(same_segment_SS & causal_SS))
    return torch.stack(masks).unsqueeze(1)


def thd_packed_seq_params(cu_seqlens: list[torch.Tensor], seq_length: int):
    """megatron `PackedSeqParams` (qkv_format "thd") for a batch flattened to one row of B*S tokens.

    With Transformer Engine the batch goes in as input_ids.view(1, B*S) (same for
    position_ids, labels, loss_mask); sample b's boundaries are offset by b*S.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    for boundaries in cu_seqlens:
        segment_ids(boundaries, seq_length)  # each sample must cover exactly S tokens
    pieces = [cu_seqlens[0].to(torch.int32)]
    for index, boundaries in enumerate(cu_seqlens[1:], start=1):
        pieces.append(boundaries[1:].to(torch.int32) + index * seq_length)
    flat = torch.cat(pieces)
    max_seqlen = int((flat[1:] - flat[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=flat,
        cu_seqlens_kv=flat,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )
