"""DoRA and rsLoRA adapters on megatron-core's tensor-parallel linear layers.

Math (DoRA: Liu et al. 2024; rsLoRA: Kalajdzievski 2023). With s = alpha/sqrt(r) (alpha/r
without rsLoRA) and n = ||W + s·B·A|| per output row, treated as a constant (detached, as
in the DoRA paper's section 4.3 and in PEFT):
    LoRA:  y = W x + s·B·A·x
    DoRA:  y = (m / n) ⊙ (W x + s·B·A·x)
Dropout on the adapter input d(x) has two forms (see docs/DORA.md): "lowrank"
(m/n)⊙(W x + s·B·A·d(x)), and "peft", PEFT's W x + (m/n - 1)⊙W d(x) + (m/n)⊙s·B·A·d(x),
which costs one more base GEMM.

Same function as PEFT's target_modules="all-linear" on Qwen3: megatron fuses q/k/v (per GQA
group [its q heads, one k head, one v head]) and gate/up ([gate_r; up_r] on each TP rank),
so each HF projection inside a fused layer gets its own A, B and magnitude slice.

Tensor parallelism. Column-parallel layers (linear_qkv, linear_fc1) hold whole output rows:
A is replicated, B and m are split by rows, norms are local, and h = A·x goes through
megatron's copy-to-TP region so the replicated A receives the gradient summed over ranks.
Row-parallel layers (linear_proj, linear_fc2) hold an input slice of every row: A is split
by columns, B and m are replicated, h = A_r·x_r is summed over TP before B, and the squared
partial row norms are all-reduced.

Speed. n changes only when the optimizer steps, so it is computed once and cached; the
training loop calls `invalidate_dora_norms(model)` after each optimizer step (micro-batches
and activation recompute reuse it). It is computed without forming W + s·B·A:
    n² = ||W||² + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)
where ||W||² is cached while W is unchanged (W is frozen). GEMMs run in the weight dtype
(fp32 accumulation), sums in fp32.

Legend: T.. leading token dims ([seq, batch] in megatron), I in features on this rank,
O out features on this rank, G query groups on this rank, r adapter rank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gazal_nemo.models.qwen3 import Qwen3Shape
from gazal_nemo.peft.config import AdapterConfig

# Every HF projection an adapter can cover, in a fixed order (seeds A's initialisation).
HF_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TargetSpec:
    """Where a megatron linear sits in a TransformerLayer and which HF projections it fuses."""

    path: str  # attribute path inside megatron's TransformerLayer
    parallel: str  # "column" (output rows split over TP) or "row" (input columns split)
    hf_block: str  # HF submodule: "self_attn" or "mlp"
    parts: tuple[str, ...]  # HF projections, e.g. ("q", "k", "v") for q_proj, k_proj, v_proj


TARGET_SPECS = {
    "linear_qkv": TargetSpec("self_attention.linear_qkv", "column", "self_attn", ("q", "k", "v")),
    "linear_proj": TargetSpec("self_attention.linear_proj", "row", "self_attn", ("o",)),
    "linear_fc1": TargetSpec("mlp.linear_fc1", "column", "mlp", ("gate", "up")),
    "linear_fc2": TargetSpec("mlp.linear_fc2", "row", "mlp", ("down",)),
}


@dataclass(frozen=True)
class FusedRows:
    """How a megatron weight's output rows interleave the HF projections it fuses.

    The rows come in `groups` equal blocks and each block holds every part's rows back to
    back: linear_qkv has one block per local GQA group ([q heads, k head, v head]),
    linear_fc1 one block [gate_r; up_r], unfused layers one block of one part.
    """

    parts: tuple[str, ...]
    rows_per_group: tuple[int, ...]
    groups: int

    @property
    def num_rows(self) -> int:
        return self.groups * sum(self.rows_per_group)

    def part_rows(self, index: int) -> int:
        return self.groups * self.rows_per_group[index]

    def split(self, weight_OI: torch.Tensor) -> list[torch.Tensor]:
        """Views [G, rows of part, I] of each part's rows (no copies)."""
        blocks = weight_OI.view(self.groups, sum(self.rows_per_group), weight_OI.shape[-1])
        return list(blocks.split(self.rows_per_group, dim=1))

    def join(self, per_part: list[torch.Tensor]) -> torch.Tensor:
        """Per-part [..., G*rows_p] tensors -> the fused [..., O] layout."""
        if len(per_part) == 1:
            return per_part[0]
        lead = per_part[0].shape[:-1]
        blocks = [t.reshape(*lead, self.groups, n) for t, n in zip(per_part, self.rows_per_group)]
        return torch.cat(blocks, dim=-1).reshape(*lead, self.num_rows)


def fused_rows(target: str, shape: Qwen3Shape, tp_size: int) -> FusedRows:
    """The row layout of `target`'s weight on one TP rank."""
    if target == "linear_qkv":
        groups = shape.num_key_value_heads // tp_size
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        d = shape.head_dim
        return FusedRows(("q", "k", "v"), (per_group * d, d, d), groups)
    if target == "linear_fc1":
        ffn = shape.intermediate_size // tp_size
        return FusedRows(("gate", "up"), (ffn, ffn), 1)
    return FusedRows(TARGET_SPECS[target].parts, (shape.hidden_size,), 1)


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()


def _bias_in_output(base) -> bool:
    """True when the layer adds a real bias to its output (DoRA would have to leave it unscaled)."""
    bias = getattr(base, "bias", None)
    if not isinstance(bias, torch.Tensor) or bias.numel() == 0:
        return False
    if hasattr(base, "te_return_bias"):
        return not base.te_return_bias
    return not getattr(base, "skip_bias_add", False)


class AdaptedLinear(nn.Module):
    """A megatron column/row-parallel linear plus LoRA or DoRA; returns (output, bias) like it.

    Parameters: lora_A[part] [r, I], lora_B[part] [rows of part on this rank, r] (W's dtype)
    and, with DoRA, magnitude[part] [rows of part on this rank] (fp32); the base layer stays
    at `.base`.
    """

    disabled = False  # set by adapters_disabled(): the layer computes the base function only

    def __init__(self, base: nn.Module, *, target: str, rows: FusedRows, cfg: AdapterConfig,
                 layer_index: int, seed: int = 0):
        super().__init__()
        self.base = base
        self.target = target
        self.spec = TARGET_SPECS[target]
        self.rows = rows
        self.layer_index = layer_index
        self.rank = cfg.rank
        self.scaling = cfg.scaling
        self.use_dora = cfg.use_dora
        self.dropout_p = float(cfg.dropout)
        self.dropout_mode = cfg.dropout_mode
        self.lora_dropout = nn.Dropout(self.dropout_p)
        self.tp_size, self.tp_rank = _tp()
        config = getattr(base, "config", None)
        self.sequence_parallel = bool(getattr(config, "sequence_parallel", False)) and self.tp_size > 1
        self.returns_layernorm_output = _enable_layernorm_output(base)
        self.merged = False
        self.num_norm_computations = 0
        self._norm_O = None  # cached fp32 row norms ||W + s·B·A|| (full rows), None = stale
        self._weight_sq = None  # (weight version key, fp32 ||W_i||² over this rank's columns)
        self._merge_scale_O = None
        self._check_base()
        self._init_parameters(seed)

    # ---- construction -------------------------------------------------------------------

    def _check_base(self) -> None:
        weight = self.base.weight
        where = f"decoder layer {self.layer_index} {self.target}"
        if weight.dim() != 2 or weight.shape[0] != self.rows.num_rows:
            raise ValueError(f"{where}: weight shape {tuple(weight.shape)} does not match the model shape "
                             f"({self.rows.num_rows} output rows expected on this TP rank)")
        if getattr(self.base, "gather_output", False):
            raise ValueError(f"{where}: gather_output=True is not supported (outputs must stay TP-local)")
        if _bias_in_output(self.base):
            raise ValueError(f"{where}: has a bias added to its output; the adapter supports bias-free "
                             "linears only (Qwen3 has none)")

    def _init_parameters(self, seed: int) -> None:
        """A kaiming-uniform like PEFT (same global A on every TP rank), B zero, m = ||W|| rows."""
        from megatron.core.tensor_parallel.layers import (
            set_defaults_if_not_set_tensor_model_parallel_attributes,
            set_tensor_model_parallel_attributes,
        )

        weight = self.base.weight
        row_parallel = self.spec.parallel == "row"
        in_global = weight.shape[1] * (self.tp_size if row_parallel else 1)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for index, part in enumerate(self.rows.parts):
            gen = torch.Generator().manual_seed(
                seed * 1_000_003 + self.layer_index * len(HF_PROJECTIONS) + HF_PROJECTIONS.index(part))
            a_global = torch.empty(self.rank, in_global)
            nn.init.kaiming_uniform_(a_global, a=math.sqrt(5), generator=gen)
            a_local = a_global.chunk(self.tp_size, dim=1)[self.tp_rank] if row_parallel else a_global
            self.lora_A[part] = nn.Parameter(a_local.to(device=weight.device, dtype=weight.dtype).contiguous())
            self.lora_B[part] = nn.Parameter(torch.zeros(self.rows.part_rows(index), self.rank,
                                                         device=weight.device, dtype=weight.dtype))
        self.magnitude = nn.ParameterDict()
        if self.use_dora:
            norm_O = self._compute_weight_norm()
            # fp32 whatever W's dtype: m == n bit for bit at init, so the adapted model starts
            # exactly at the base model (a bf16 m would be off by its rounding, up to 2^-9).
            for part, m in zip(self.rows.parts, _split_vector(self.rows, norm_O)):
                self.magnitude[part] = nn.Parameter(m.contiguous())
            self.num_norm_computations = 0
        for kind, params in (("A", self.lora_A), ("B", self.lora_B), ("m", self.magnitude)):
            sharded_dim = _sharded_dim(kind, row_parallel)
            for p in params.values():
                if sharded_dim is None:
                    set_defaults_if_not_set_tensor_model_parallel_attributes(p)
                    # Replicated params fed by sequence-sharded activations: megatron all-reduces their grads.
                    p.sequence_parallel = self.sequence_parallel and row_parallel
                else:
                    set_tensor_model_parallel_attributes(p, True, sharded_dim, 1)

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x, *args, **kwargs):
        base_out, bias, x_in = self._base_forward(x, *args, **kwargs)
        if self.merged or self.disabled:
            return base_out, bias
        if self.spec.parallel == "column" and self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            # The adapter's dx comes back whole (A's path is all-reduced), so the backward only splits.
            x_in = gather_from_sequence_parallel_region(x_in, tensor_parallel_output_grad=False)
        dropped = self._dropout(x_in)
        lowrank = self._lowrank(dropped)
        if not self.use_dora:
            return base_out + lowrank, bias
        scale = self.magnitude_scale().to(base_out.dtype)
        if self.dropout_mode == "peft" and self._dropout_active():
            return base_out + (scale - 1) * self._base_matmul(dropped) + scale * lowrank, bias
        return scale * (base_out + lowrank), bias

    def _base_forward(self, x, *args, **kwargs):
        """(W x, bias, the input W saw): TE's fused-norm linears also return the normed input."""
        out = self.base(x, *args, **kwargs)
        if not self.returns_layernorm_output:
            linear, bias = out
            return linear, bias, x
        if len(out) == 3:
            return out
        (linear, normed), bias = out
        return linear, bias, normed

    def _dropout_active(self) -> bool:
        return self.training and self.dropout_p > 0

    def _dropout(self, x):
        if not self._dropout_active():
            return x
        if self.spec.parallel == "row" and self.tp_size > 1 and x.is_cuda:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            # Each rank holds a different input slice: draw independent masks per TP rank
            # (megatron's tensor-parallel CUDA generator; on CPU there is only one generator).
            with get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        # Replicated input: the default generator draws the same mask on every TP rank.
        return self.lora_dropout(x)

    def _lowrank(self, x):
        """s·B·A·x in the base output's layout, with the TP communication of this layer kind."""
        from megatron.core.tensor_parallel import mappings

        parts = self.rows.parts
        if self.spec.parallel == "column":
            a = self.lora_A[parts[0]] if len(parts) == 1 else torch.cat([self.lora_A[p] for p in parts])
            h = F.linear(x, a)  # [T.., parts*r]
            if self.tp_size > 1:
                h = mappings.copy_to_tensor_model_parallel_region(h)
            h = h * self.scaling
            return self.rows.join([F.linear(h_p, self.lora_B[p]) for p, h_p in zip(parts, h.split(self.rank, -1))])
        h = F.linear(x, self.lora_A[parts[0]])  # partial sum over this rank's input slice
        h = self._reduce_row_parallel(h)
        return F.linear(h * self.scaling, self.lora_B[parts[0]])

    def _reduce_row_parallel(self, partial):
        if self.tp_size == 1:
            return partial
        from megatron.core.tensor_parallel import mappings

        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(partial)
        return mappings.reduce_from_tensor_model_parallel_region(partial)

    def _base_matmul(self, x):
        """W x through the frozen weight with this layer's TP communication (PEFT dropout mode)."""
        weight = self.base.weight
        if self.spec.parallel == "column":
            if self.tp_size > 1:
                from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

                x = copy_to_tensor_model_parallel_region(x)
            return F.linear(x, weight)
        return self._reduce_row_parallel(F.linear(x, weight))

    def magnitude_scale(self):
        """m / n in fp32 (differentiable in m; n cached and detached)."""
        if self._norm_O is None:
            self._norm_O = self._compute_weight_norm()
        m_O = self.rows.join([self.magnitude[p] for p in self.rows.parts])
        return m_O.float() / self._norm_O

    # ---- the weight norm ------------------------------------------------------------------

    @torch.no_grad()
    def _compute_weight_norm(self) -> torch.Tensor:
        """fp32 ||W + s·B·A|| per output row, without forming the matrix; summed over TP for row layers."""
        weight = self.base.weight
        pieces = [lowrank_row_terms(w_GRI, self.lora_A[part], self.lora_B[part], self.scaling)
                  for part, w_GRI in zip(self.rows.parts, self.rows.split(weight))]
        sq_O = self._base_row_sq() + self.rows.join(pieces)
        if self.spec.parallel == "row" and self.tp_size > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(sq_O, group=ps.get_tensor_model_parallel_group())
        self.num_norm_computations += 1
        return sq_O.clamp_min(0).sqrt()

    def _base_row_sq(self) -> torch.Tensor:
        """||W_i||² over this rank's columns, cached until the weight is written."""
        weight = self.base.weight
        key = (weight.data_ptr(), weight._version)
        if self._weight_sq is None or self._weight_sq[0] != key:
            sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
            self._weight_sq = (key, sq)
        return self._weight_sq[1]

    def invalidate_norm(self) -> None:
        self._norm_O = None

    # ---- merge ------------------------------------------------------------------------------

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's W' = (m/n)(W + s·B·A) (LoRA: W + s·B·A) in W's dtype; W is not modified."""
        weight = self.base.weight
        if self.merged:
            return weight.detach().clone()
        return self._merged_fp32(self._fresh_scale()).to(weight.dtype)

    def _fresh_scale(self):
        """m/n from a norm computed now (merging must not trust a cache the loop forgot to invalidate)."""
        if not self.use_dora:
            return None
        self.invalidate_norm()
        return self.magnitude_scale()

    def _merged_fp32(self, scale_O) -> torch.Tensor:
        # A copy even when W is fp32 already: .float() would return W itself and the delta would land in it.
        w_OI = self.base.weight.detach().to(torch.float32, copy=True)
        self._add_delta(w_OI, sign=1.0)
        if scale_O is not None:
            w_OI *= scale_O[:, None]
        return w_OI

    def _add_delta(self, w_OI: torch.Tensor, *, sign: float) -> None:
        for part, w_GRI in zip(self.rows.parts, self.rows.split(w_OI)):
            b_GRr = self.lora_B[part].float().view(w_GRI.shape[0], w_GRI.shape[1], self.rank)
            w_GRI += (sign * self.scaling) * torch.matmul(b_GRr, self.lora_A[part].float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (for inference and weight sync); forward then skips it."""
        if self.merged:
            return
        self._merge_scale_O = self._fresh_scale()
        weight = self.base.weight
        weight.copy_(self._merged_fp32(self._merge_scale_O).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: W = W'/(m/n) - s·B·A with the scale used when merging."""
        if not self.merged:
            return
        weight = self.base.weight
        w_OI = weight.float()
        if self.use_dora:
            w_OI /= self._merge_scale_O[:, None]
        self._add_delta(w_OI, sign=-1.0)
        weight.copy_(w_OI.to(weight.dtype))
        self.merged = False
        self._merge_scale_O = None
        self.invalidate_norm()

    # ---- megatron integration ---------------------------------------------------------------

    def hf_module_name(self, part: str) -> str:
        """HF module name of one projection, e.g. model.layers.3.self_attn.q_proj."""
        return f"model.layers.{self.layer_index}.{self.spec.hf_block}.{part}_proj"

    def tp_layouts(self) -> dict[str, str]:
        """mapping.tp_slice layout of A, B and m: 'rep', 'col' (rows split) or 'row' (columns split)."""
        if self.spec.parallel == "column":
            return {"lora_A": "rep", "lora_B": "col", "magnitude": "col"}
        return {"lora_A": "row", "lora_B": "rep", "magnitude": "rep"}

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base keeps its own keys (a base-only checkpoint still fits); adapter tensors sharded per TP."""
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sharded = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        tensors = {name: p for name, p in self.named_parameters() if not name.startswith("base.")}
        axes = {name: p.partition_dim for name, p in tensors.items() if p.tensor_model_parallel}
        sharded.update(make_sharded_tensors_for_checkpoint(
            tensors, prefix, axes, sharded_offsets, tp_group=ps.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"]))
        return sharded

    def __getattr__(self, name):
        # megatron reads attributes of its linears (weight, backward_dw, layer_norm_weight...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None or name == "base":
                raise
            return getattr(base, name)


def lowrank_row_terms(w_GRI: torch.Tensor, a_rI: torch.Tensor, b_Rr: torch.Tensor, scaling: float) -> torch.Tensor:
    """fp32 ||W_i + s(BA)_i||² - ||W_i||² = 2s·rowsum(B ⊙ W Aᵀ) + s²·rowsum(B (A Aᵀ) ⊙ B), flat [G*R].

    w_GRI: the part's rows of W viewed [G, R, I]; a_rI: A; b_Rr: B with G*R rows. Costs one
    [R, I] x [I, r] GEMM instead of forming the [R, I] matrix B·A.
    """
    r = a_rI.shape[0]
    b_GRr = b_Rr.float().view(w_GRI.shape[0], w_GRI.shape[1], r)
    wa_GRr = torch.matmul(w_GRI, a_rI.t().to(w_GRI.dtype)).float()
    aa_rr = a_rI.float() @ a_rI.float().t()
    cross = (b_GRr * wa_GRr).sum(-1)
    lowrank_sq = (torch.matmul(b_GRr, aa_rr) * b_GRr).sum(-1)
    return (2 * scaling * cross + scaling * scaling * lowrank_sq).reshape(-1)


def _sharded_dim(kind: str, row_parallel: bool) -> int | None:
    """TP partition dim of A/B/m, None when replicated."""
    if row_parallel:
        return 1 if kind == "A" else None
    return None if kind == "A" else 0


def _split_vector(rows: FusedRows, vector_O: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of rows.join for a 1-D per-row vector."""
    return [v.reshape(-1) for v in rows.split(vector_O[:, None])]


def _enable_layernorm_output(base) -> bool:
    """TE's LayerNormLinear normalises its input inside; ask it to hand the normed input back."""
    if not hasattr(base, "return_layernorm_output"):
        return False
    base.return_layernorm_output = True
    base.return_layernorm_output_gathered = False
    return True


def _supported_classes(parallel: str) -> tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    classes = [ColumnParallelLinear] if parallel == "column" else [RowParallelLinear]
    try:
        from megatron.core.extensions import transformer_engine as te_ext

        names = ("TELayerNormColumnParallelLinear", "TEColumnParallelLinear") if parallel == "column" \
            else ("TERowParallelLinear",)
        classes += [getattr(te_ext, n) for n in names if hasattr(te_ext, n)]
    except Exception:  # noqa: BLE001 - Transformer Engine is optional (absent on CPU)
        pass
    return tuple(classes)


def _unwrap(model):
    while hasattr(model, "module") and not isinstance(model, AdaptedLinear):
        model = model.module
    return model


def _get_path(module, path: str):
    for attr in path.split("."):
        module = getattr(module, attr)
    return module


def apply_adapter(model, cfg: AdapterConfig, shape: Qwen3Shape, *, seed: int = 0) -> list[nn.Parameter]:
    """Adapt cfg.targets of every decoder layer in place, freeze the rest; returns the adapter params.

    Call on the bare GPTModel after its weights are loaded and before megatron's DDP wraps it.
    `seed` fixes A's initialisation (identical on every TP rank and for any TP/PP layout).
    """
    if hasattr(model, "module"):
        raise ValueError("apply_adapter: pass the bare GPTModel, before DDP/Float16 wrapping")
    if adapted_layers(model):
        raise ValueError("apply_adapter: the model already has an adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    tp_size, _ = _tp()
    decoder = getattr(model, "decoder", None)
    if decoder is None:
        raise ValueError("apply_adapter: model has no .decoder (expected a megatron GPTModel)")
    supported = {kind: _supported_classes(kind) for kind in ("column", "row")}
    for layer in decoder.layers:
        layer_index = layer.layer_number - 1  # megatron's layer_number is global and 1-based
        for target in cfg.targets:
            spec = TARGET_SPECS[target]
            parent_path, _, attr = spec.path.rpartition(".")
            parent = _get_path(layer, parent_path)
            base = getattr(parent, attr)
            if not isinstance(base, supported[spec.parallel]):
                raise ValueError(f"decoder layer {layer_index} {target}: {type(base).__name__} is not a "
                                 f"supported {spec.parallel}-parallel linear")
            setattr(parent, attr, AdaptedLinear(base, target=target, rows=fused_rows(target, shape, tp_size),
                                                cfg=cfg, layer_index=layer_index, seed=seed))
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(_differentiable_output)
    return adapter_parameters(model)


def _differentiable_output(module, inputs, output):
    """With the embedding frozen its output needs no grad, so megatron's activation recompute
    (an autograd.Function whose only tensor inputs are activations) would cut every adapter
    out of the graph; marking the output as requiring grad keeps them in (HF's
    enable_input_require_grads does the same for gradient checkpointing)."""
    if isinstance(output, torch.Tensor) and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return output


def adapted_layers(model) -> list[AdaptedLinear]:
    """Every adapted linear of the model (or of a list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in _unwrap(chunk).modules() if isinstance(m, AdaptedLinear)]


def adapter_parameters(model) -> list[nn.Parameter]:
    return [p for layer in adapted_layers(model) for n, p in layer.named_parameters() if not n.startswith("base.")]


@contextlib.contextmanager
def adapters_disabled(model):
    """Run the base model's function without copying weights (the KL reference for GRPO beta > 0)."""
    layers = adapted_layers(model)
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def invalidate_dora_norms(model) -> None:
    """Mark cached weight norms stale; call after every optimizer step (and after loading adapter weights)."""
    for layer in adapted_layers(model):
        layer.invalidate_norm()


def merge_adapter(model) -> None:
    """Fold every adapter into its base weight in place (W' = (m/n)(W + s·B·A))."""
    for layer in adapted_layers(model):
        layer.merge()


def unmerge_adapter(model) -> None:
    """Restore the base weights after `merge_adapter` (to float rounding of W's dtype)."""
    for layer in adapted_layers(model):
        layer.unmerge()


def _adapter_named_parameters(model) -> dict[str, nn.Parameter]:
    own = set(map(id, adapter_parameters(model)))
    return {n: p for n, p in _unwrap(model).named_parameters() if id(p) in own}


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """This rank's adapter tensors only (names as in model.named_parameters), detached on CPU."""
    return {n: p.detach().cpu().clone() for n, p in _adapter_named_parameters(model).items()}


@torch.no_grad()
def load_adapter_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Load what `adapter_state_dict` saved (same layout); strict on names and shapes."""
    own = _adapter_named_parameters(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"adapter state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, param in own.items():
        if tuple(state[name].shape) != tuple(param.shape):
            raise ValueError(f"adapter state dict: {name} has shape {tuple(state[name].shape)}, "
                             f"the model's is {tuple(param.shape)} (different rank or parallel layout?)")
        param.copy_(state[name].to(param.dtype))
    invalidate_dora_norms(model)
