"""Core attention on `torch.nn.functional.scaled_dot_product_attention`.

megatron-core's own `DotProductAttention` materialises the [b, heads, s, s] score matrix;
without Transformer Engine that makes long-sequence training slow and memory-bound.
SDPA dispatches to flash / memory-efficient kernels on GPU and runs on CPU too, so this
module is the core attention of our torch-native layer spec.

Shapes (megatron's layout): query [s, b, heads_local, d], key/value [s, b, groups_local, d];
output [s, b, heads_local * d]. A boolean `attention_mask` follows megatron's convention
(True = masked out), broadcastable to [b, 1, s, s]; None means plain causal attention.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron's DotProductAttention (same constructor and forward signature)."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine spec (parallel.cp=1 without TE)")
        from megatron.core.process_groups_config import ProcessGroupCollection

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.num_heads_local = divide(config.num_attention_heads, tp_size)
        self.num_groups_local = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.attn_mask_type = attn_mask_type

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (THD) needs the Transformer Engine spec; "
                             "the torch spec takes packed documents as a block-diagonal attention_mask")
        q_BHSD = query.permute(1, 2, 0, 3)
        k_BGSD = key.permute(1, 2, 0, 3)
        v_BGSD = value.permute(1, 2, 0, 3)
        repeat = self.num_heads_local // self.num_groups_local
        if repeat > 1:
            k_BGSD = k_BGSD.repeat_interleave(repeat, dim=1)
            v_BGSD = v_BGSD.repeat_interleave(repeat, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        mask_type = attn_mask_type or self.attn_mask_type
        if attention_mask is None:
            out_BHSD = F.scaled_dot_product_attention(
                q_BHSD, k_BGSD, v_BGSD, dropout_p=dropout_p, scale=self.softmax_scale,
                is_causal=mask_type == AttnMaskType.causal and q_BHSD.shape[2] > 1,
            )
        else:
            out_BHSD = F.scaled_dot_product_attention(
                q_BHSD, k_BGSD, v_BGSD, attn_mask=~attention_mask, dropout_p=dropout_p, scale=self.softmax_scale,
            )
        seq, batch = query.shape[0], query.shape[1]
        return out_BHSD.permute(2, 0, 1, 3).reshape(seq, batch, -1)
