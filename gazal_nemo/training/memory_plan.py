"""Per-GPU memory plan of a recipe: what each rank holds, item by item, against the GPU.

Static items are counted exactly from the model's shape, the way megatron-core allocates
them: the 16-bit weights (for trainable params, megatron DDP's contiguous param buffer,
padded: each param starts at a multiple of 64 elements and the buffer ends at a multiple
of lcm(dp, 128) under the distributed optimizer), the adapter (DoRA/LoRA A, B and
magnitudes, with DoRA's two fp32 row-norm caches), DDP's gradient buffer (fp32 unless
`precision.grad_reduce_in_fp32` is off), and the optimizer (fp32 main params plus EXAdam's
two fp32 moments, sharded over data-parallel ranks by the distributed optimizer, kept on
the host for the share `optim.cpu_offload_fraction`). tests/unit/test_memory_plan.py checks
these against the bytes the built model and optimizer really allocate.

Dynamic items are modelled. Activations follow Korthikanti et al., "Reducing Activation
Recomputation in Large Transformer Models" (2022), whose Table 2 gives per-layer bytes
34·s·b·h + 5·a·s²·b (no parallelism) and s·b·h·(10 + 24/t + 5·a·s/(h·t)) with tensor
parallelism t. We keep their accounting but redo the sum for Qwen3's layer: no dropout
(their dropout masks, 2·s·b·h, go), GQA (k and v are kv_heads·head_dim wide, not h), qk
RMSNorm (q and k are stored before and after it), SwiGLU with ffn = 5h (gate, up, silu and
product stored: 10 bytes per ffn unit, their MLP being 19·h for a 4h GELU), and fused
attention (flash / TE / SDPA efficient kernels store no s² scores, so their 5·a·s²·b term
has coefficient 0; set `layer_attention_scores` to 2 for an unfused softmax). With
sequence parallelism (TE only here) their replicated 10·s·b·h part is divided by t as in
their section 4.2.2. Full recompute stores each layer's input (their 2·s·b·h per layer)
plus the working set of the layer being recomputed; selective recompute drops only the
attention-score term. All coefficients sit in `ActivationCoefficients`, one number each,
so GPU measurements can calibrate them (`fit_coefficients`, docs/MEMORY.md). The defaults
describe the Transformer Engine spec (fused norms saving their bf16 input, flash attention
over the GQA k/v). The torch-native spec differs: its RMSNorm saves fp32 copies (~8 B per
unit instead of 2) and its SDPA path saves k and v repeated to all query heads.

Phases: training (activations, logits), GRPO rollout (KV cache, prefill) and the
optimizer step (update temporaries) never hold their memory at the same time, so the
total is static + the largest phase + allocator headroom + CUDA context.

The vLLM engine (grpo.rollout.engine=vllm) is sized by its own budget: vLLM takes
`gpu_memory_utilization` x the GPU for a merged bf16 copy of the weights (exact, from the
shape), a workspace, and fills the rest with KV cache. Between rollouts it sleeps (CUDA):
level 2 frees weights and KV cache, level 1 frees the KV cache and moves the weights to the
host, 0 keeps everything; what sleep frees is rollout-phase memory, what it keeps is static.
The plan says how many tokens the KV cache holds and refuses a budget that leaves less than
one full-length sequence (vLLM would refuse to start). With asynchronous rollouts the
trainer's GPUs hold no engine and the generator ranks' GPUs hold vLLM alone, awake
(`plan_generator_memory`); `gazal plan` prints both sides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GIB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PHASES = ("static", "train", "rollout", "step")
# HF projections per adapted megatron linear (DoRA gives each its own A, B, magnitude).
ADAPTER_PARTS = {"linear_qkv": ("q", "k", "v"), "linear_proj": ("o",), "linear_fc1": ("gate", "up"),
                 "linear_fc2": ("down",)}


@dataclass(frozen=True, kw_only=True)
class ActivationCoefficients:
    """Bytes of stored activations per token and per unit of a layer dimension (bf16 = 2 per
    value), plus the allocator terms. Defaults are derived, not yet measured on a GPU."""

    layer_replicated: float = 8.0
    """Per hidden unit: the two RMSNorm inputs and the inputs of linear_qkv and linear_fc1 (4 x 2 B); /tp with SP."""
    layer_query: float = 6.0
    """Per query unit (heads*head_dim/tp): q before qk-norm, q after RoPE, the attention output (3 x 2 B)."""
    layer_kv: float = 6.0
    """Per kv unit (kv_heads*head_dim/tp): k before qk-norm, k after RoPE, v (3 x 2 B)."""
    layer_ffn: float = 10.0
    """Per ffn unit (/tp): fc1's gate+up output (4 B), megatron's glu: silu(gate), up + offset (2 x 2 B), fc2 input (2 B)."""
    layer_attention_scores: float = 0.0
    """Per (heads/tp x seq) unit: stored softmax; 0 for fused attention (flash, TE, SDPA efficient), 2 unfused."""
    adapter_input: float = 3.0
    """Per adapted-linear input unit: the adapter's dropout output (2 B) and mask (1 B)."""
    adapter_rank: float = 2.0
    """Per rank unit and HF projection: A x (2 B)."""
    adapter_output: float = 2.0
    """Per adapted-linear output unit (DoRA only): W x + s B A x before the magnitude scale (2 B)."""
    checkpoint_input: float = 2.0
    """Full recompute: the stored input of every layer, per hidden unit (2 B; /tp with SP)."""
    recompute_working_layers: float = 2.0
    """Full recompute: layers' worth of activations alive in backward (the recomputed layer and its gradients)."""
    head_replicated: float = 4.0
    """Per hidden unit: final-norm input and output-layer input (2 x 2 B; /tp with SP)."""
    logits_sft: float = 8.0
    """Per token and vocab/tp entry, SFT: bf16 logits (2) + megatron CE's fp32 softmax (4) + temporaries (2)."""
    logits_grpo: float = 18.0
    """Per token and vocab/tp entry, GRPO: bf16 logits (2) + saved fp32 softmax (4) + filter/entropy temporaries (12)."""
    rollout_prefill_layers: float = 1.0
    """No-grad prefill of the rollout: layers' worth of activations alive at once."""
    optimizer_step_temporaries: float = 3.0
    """Full-size fp32 temporaries of one update (EXAdam: numerator, d1/m^2, d2), times the largest shard."""
    fragmentation: float = 0.05
    """Allocator headroom: reserved-but-unused memory as a fraction of the allocated peak."""
    cuda_context_gib: float = 1.0
    """CUDA context, cuBLAS workspaces and NCCL buffers (outside PyTorch's allocator)."""
    vllm_workspace_gib: float = 1.5
    """vLLM inside its gpu_memory_utilization share besides weights and KV cache: the profiled forward's
    activations, sampler buffers and CUDA graph pools (vLLM reports it at start-up as non-KV memory)."""
    vllm_asleep_gib: float = 0.5
    """What a sleeping vLLM still holds (CUDA graph pools, small buffers)."""


@dataclass(frozen=True)
class MemoryItem:
    """One line of the plan."""

    name: str
    bytes: float
    phase: str  # static, train, rollout, step (phases exclude each other), overhead, host
    note: str  # the formula, in words


@dataclass
class MemoryPlan:
    """What one GPU holds for a recipe at a world size, and whether it fits."""

    recipe_name: str
    layout: str
    items: list[MemoryItem]
    gpu_memory_bytes: float
    train_terms: dict[str, float] = field(default_factory=dict)
    """Activation features of the training phase: bytes = sum(coefficient x term) (see fit_coefficients)."""
    shortfalls: list[str] = field(default_factory=list)
    """Reasons the job cannot start whatever the totals (e.g. a vLLM budget with no room for one sequence)."""

    def phase_bytes(self, phase: str) -> float:
        return sum(i.bytes for i in self.items if i.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(("train", "rollout", "step"), key=self.phase_bytes)

    @property
    def total_bytes(self) -> float:
        """Static + the largest phase + overheads; host memory is not counted."""
        return self.phase_bytes("static") + self.phase_bytes(self.peak_phase) + self.phase_bytes("overhead")

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_memory_bytes and not self.shortfalls

    @property
    def largest(self) -> MemoryItem:
        return max((i for i in self.items if i.phase != "host"), key=lambda i: i.bytes)

    def verdict(self) -> str:
        total, gpu = self.total_bytes / GIB, self.gpu_memory_bytes / GIB
        largest = f"largest item: {self.largest.name} ({self.largest.bytes / GIB:.1f} GiB)"
        if self.shortfalls:
            return f"DOES NOT FIT: {'; '.join(self.shortfalls)}"
        if self.fits:
            return f"FITS: {total:.1f} of {gpu:.1f} GiB per GPU ({gpu - total:.1f} GiB free); {largest}"
        return f"DOES NOT FIT: {total:.1f} GiB per GPU > {gpu:.1f} GiB ({total - gpu:.1f} GiB over); {largest}"

    def format_table(self) -> str:
        width = max(len(i.name) for i in self.items)
        lines = [f"# memory plan: {self.recipe_name} ({self.layout})",
                 f"{'item':<{width}}  {'phase':<8} {'GiB':>7}  formula"]
        for item in self.items:
            lines.append(f"{item.name:<{width}}  {item.phase:<8} {item.bytes / GIB:7.2f}  {item.note}")
        lines.append(f"{'total':<{width}}  {'':<8} {self.total_bytes / GIB:7.2f}  static "
                     f"{self.phase_bytes('static') / GIB:.2f} + peak phase '{self.peak_phase}' "
                     f"{self.phase_bytes(self.peak_phase) / GIB:.2f} + overhead {self.phase_bytes('overhead') / GIB:.2f}")
        host = self.phase_bytes("host")
        if host:
            lines.append(f"host memory per rank (not on the GPU): {host / GIB:.1f} GiB")
        lines.append(self.verdict())
        return "\n".join(lines)


# ---- parameter counts on one rank --------------------------------------------------------


def rank_base_tensors(shape, *, tp: int, pp: int) -> list[tuple[int, str]]:
    """(elements, kind) of the model tensors on the heaviest pipeline stage of one TP rank
    (megatron's Qwen3 layer: separate RMSNorm weights, fused qkv and gate/up). kind is
    "matrix" or "norm" (norm weights are fp32 in the torch-native spec, see `tensor_bytes`)."""
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    matrices = [(q + 2 * kv) // tp * h, h * (q // tp), 2 * f // tp * h, h * (f // tp)]
    if shape.attention_bias:
        matrices.append((q + 2 * kv) // tp)
    per_layer = [(n, "matrix") for n in matrices] + [(n, "norm") for n in (h, d, d, h)]
    embedding = (shape.vocab_size // tp * h, "matrix")
    if pp == 1:
        ends = [embedding, (h, "norm")] + ([] if shape.tie_word_embeddings else [embedding])
    else:  # first stage: embedding; last: final norm + output layer (a copy when tied)
        ends = [embedding, (h, "norm")]
    return per_layer * (shape.num_layers // pp) + ends


def rank_adapter_tensors(shape, adapter, *, tp: int, pp: int) -> tuple[list[tuple[int, str]], int]:
    """((elements, kind) of the adapter's A, B (kind "matrix") and DoRA magnitudes (kind
    "magnitude", fp32) on one rank, fp32 DoRA norm-cache elements). Column-parallel linears
    replicate A and split B and m by rows; row-parallel ones split A by columns and
    replicate B and m (peft/dora.py)."""
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    r = adapter.rank
    rows = {"q": q, "k": kv, "v": kv, "o": h, "gate": f, "up": f, "down": h}
    inputs = {"q": h, "k": h, "v": h, "o": q, "gate": h, "up": h, "down": f}
    tensors, cache = [], 0
    for target in adapter.targets:
        column = target in ("linear_qkv", "linear_fc1")
        for part in ADAPTER_PARTS[target]:
            local_rows = rows[part] // tp if column else rows[part]
            local_in = inputs[part] if column else inputs[part] // tp
            tensors += [(r * local_in, "matrix"), (local_rows * r, "matrix")]
            if adapter.use_dora:
                tensors.append((local_rows, "magnitude"))
                cache += 2 * local_rows  # ||W + sBA|| and ||W||^2 per row, fp32
    layers = shape.num_layers // pp
    return tensors * layers, cache * layers


def tensor_bytes(kind: str, *, dtype: str, use_te: bool) -> int:
    """Bytes per element: matrices in the recipe dtype; DoRA magnitudes always fp32; norm
    weights fp32 in megatron's torch-native norm (it ignores params_dtype), else the dtype."""
    if kind == "magnitude" or (kind == "norm" and not use_te):
        return 4
    return DTYPE_BYTES[dtype]


def buffer_numel(tensors: list[int], *, dp: int, distributed: bool) -> int:
    """Elements of one megatron DDP buffer (one bucket) for these params: padded only under
    the distributed optimizer (64-element param starts, an lcm(dp, 128) end)."""
    if not distributed:
        return sum(tensors)
    end = 0
    for numel in tensors:
        end = math.ceil(end / 64) * 64 + numel
    divisor = math.lcm(dp, 128)
    return math.ceil(end / divisor) * divisor


def ddp_buffers(tensors: list[tuple[int, str]], *, dtype: str, use_te: bool, dp: int,
                distributed: bool) -> dict[int, int]:
    """{bytes per element: buffer elements}: megatron DDP keeps one buffer per param dtype."""
    by_size: dict[int, list[int]] = {}
    for numel, kind in tensors:
        by_size.setdefault(tensor_bytes(kind, dtype=dtype, use_te=use_te), []).append(numel)
    return {size: buffer_numel(numels, dp=dp, distributed=distributed) for size, numels in by_size.items()}


# ---- the plan -----------------------------------------------------------------------------


def plan_memory(recipe, shape, *, world_size: int, gpu_memory_gib: float = 80.0, use_te: bool | None = None,
                coefficients: ActivationCoefficients | None = None) -> MemoryPlan:
    """The per-GPU plan of `recipe` on `world_size` GPUs (validated layout; ValueError otherwise).

    use_te: whether Transformer Engine runs the job (sequence parallelism needs it); None
    detects it here, which on a login node without a GPU means False.
    """
    from gazal_nemo.recipe import check_layout

    dp = check_layout(recipe, world_size, shape)
    if use_te is None:
        from gazal_nemo.models.qwen3 import transformer_engine_available

        use_te = transformer_engine_available()
    c = coefficients or ActivationCoefficients()
    par, prec = recipe.parallel, recipe.precision
    tp, pp = par.tp, par.pp
    sp = par.sequence_parallel and tp > 1 and use_te
    adapter = _trained_adapter(recipe)
    items = _static_items(recipe, shape, adapter, dp=dp, use_te=use_te)
    items += _step_items(recipe, shape, adapter, dp=dp, c=c)
    train_items, terms = _train_items(recipe, shape, adapter, sp=sp, c=c)
    items += train_items
    shortfalls: list[str] = []
    items += _rollout_items(recipe, shape, adapter, dp=dp, sp=sp, c=c, gpu_memory_gib=gpu_memory_gib,
                            shortfalls=shortfalls)
    allocated = (sum(i.bytes for i in items if i.phase == "static")
                 + max(sum(i.bytes for i in items if i.phase == p) for p in ("train", "rollout", "step")))
    items.append(MemoryItem("allocator headroom", c.fragmentation * allocated, "overhead",
                            f"{c.fragmentation:.0%} of the allocated peak (fragmentation)"))
    items.append(MemoryItem("CUDA context + NCCL", c.cuda_context_gib * GIB, "overhead",
                            "context, cuBLAS workspaces, NCCL buffers"))
    trainers = world_size
    if recipe.stage == "grpo" and recipe.grpo.rollout.mode == "async":
        trainers -= recipe.grpo.rollout.generator_ranks
    world = f"world {world_size}" if trainers == world_size else f"{trainers} trainer ranks of {world_size}"
    layout = (f"{world} = tp {tp} x pp {pp} x cp {par.cp} x dp {dp}; {prec.dtype}; "
              f"TE {'on' if use_te else 'off'}, sequence parallel {'on' if sp else 'off'}")
    return MemoryPlan(recipe_name=recipe.name, layout=layout, items=items,
                      gpu_memory_bytes=gpu_memory_gib * GIB, train_terms=terms, shortfalls=shortfalls)


def _trained_adapter(recipe):
    if recipe.stage == "grpo":
        return recipe.adapter if recipe.grpo.train_adapter else None
    return recipe.adapter


def _static_items(recipe, shape, adapter, *, dp: int, use_te: bool) -> list[MemoryItem]:
    par, prec, optim = recipe.parallel, recipe.precision, recipe.optim
    size = DTYPE_BYTES[prec.dtype]
    dist = par.distributed_optimizer
    base = rank_base_tensors(shape, tp=par.tp, pp=par.pp)
    if adapter is None:
        trainable_tensors = base
        trainable = ddp_buffers(base, dtype=prec.dtype, use_te=use_te, dp=dp, distributed=dist)
        base_bytes = sum(n * b for b, n in trainable.items())
        note = "DDP param buffer" + (", padded" if dist else "")
    else:
        base_bytes = sum(n * tensor_bytes(k, dtype=prec.dtype, use_te=use_te) for n, k in base)
        note = "frozen"
    base_numel = sum(n for n, _ in base)
    items = [MemoryItem("weights", base_bytes, "static", f"{base_numel / 1e9:.3f}B params on this rank x {size} B ({note})")]
    if adapter is not None:
        trainable_tensors, cache = rank_adapter_tensors(shape, adapter, tp=par.tp, pp=par.pp)
        trainable = ddp_buffers(trainable_tensors, dtype=prec.dtype, use_te=use_te, dp=dp, distributed=dist)
        items.append(MemoryItem("adapter", sum(n * b for b, n in trainable.items()) + cache * 4, "static",
                                f"{sum(trainable.values()) / 1e6:.1f}M A/B/m params + {cache / 1e6:.2f}M fp32 norm cache"))
    numel = sum(trainable.values())
    grad_bytes = sum(n * (4 if prec.grad_reduce_in_fp32 else b) for b, n in trainable.items())
    items.append(MemoryItem("gradients", grad_bytes, "static",
                            f"DDP grad buffer: {numel / 1e9:.3f}B trainable x {4 if prec.grad_reduce_in_fp32 else size} B"))
    # The optimizer holds the params' own elements (not the buffer padding), 1/dp of them each.
    unpadded = ddp_buffers(trainable_tensors, dtype=prec.dtype, use_te=use_te, dp=dp, distributed=False)
    shards = {b: (n / dp if dist else n) for b, n in unpadded.items()}
    # 16-bit params get an fp32 main copy; every trainable element two fp32 moments.
    optimizer_bytes = sum(n * ((4 if b < 4 else 0) + 8) for b, n in shards.items())
    frac = optim.cpu_offload_fraction
    main = 4 if size < 4 else 0
    items.append(MemoryItem("optimizer states + main params", (1 - frac) * optimizer_bytes, "static",
                            f"{numel / 1e9:.3f}B {f'/ dp {dp}' if dist else '(not sharded)'} x ({main} main + 8 moments) B"
                            + (f" x (1 - offload {frac:g})" if frac else "")))
    if frac:
        host = frac * sum(shards.values()) * (size + 4 + 4 + 8)
        items.append(MemoryItem("host: offloaded optimizer", host, "host",
                                f"offload {frac:g} x shard x ({size} copy + 4 fp32 param + 4 grad + 8 moments) B, pinned"))
    return items


def _step_items(recipe, shape, adapter, *, dp: int, c) -> list[MemoryItem]:
    par = recipe.parallel
    tensors = (rank_adapter_tensors(shape, adapter, tp=par.tp, pp=par.pp)[0] if adapter
               else rank_base_tensors(shape, tp=par.tp, pp=par.pp))
    largest = max(n for n, _ in tensors) / (dp if par.distributed_optimizer else 1)
    on_gpu = 1 - recipe.optim.cpu_offload_fraction
    return [MemoryItem("optimizer step temporaries", on_gpu * c.optimizer_step_temporaries * largest * 4, "step",
                       f"{c.optimizer_step_temporaries:g} x largest shard ({largest / 1e6:.1f}M) x 4 B")]


def layer_terms(shape, *, tp: int, sp: bool, seq: int, adapter) -> dict[str, float]:
    """Units per token of one layer, per coefficient: bytes = sum(coefficient x units)."""
    h, f, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d
    terms = {"layer_replicated": h / (tp if sp else 1), "layer_query": q / tp, "layer_kv": kv / tp,
             "layer_ffn": f / tp, "layer_attention_scores": shape.num_attention_heads / tp * seq}
    if adapter is not None:
        inputs = {"linear_qkv": h, "linear_proj": q / tp, "linear_fc1": h, "linear_fc2": f / tp}
        outputs = {"linear_qkv": (q + 2 * kv) / tp, "linear_proj": h, "linear_fc1": 2 * f / tp, "linear_fc2": h}
        terms["adapter_input"] = sum(inputs[t] for t in adapter.targets)
        terms["adapter_rank"] = sum(len(ADAPTER_PARTS[t]) for t in adapter.targets) * adapter.rank
        terms["adapter_output"] = sum(outputs[t] for t in adapter.targets) if adapter.use_dora else 0.0
    return terms


def _dot(c, terms: dict[str, float]) -> float:
    return sum(getattr(c, name) * units for name, units in terms.items())


def train_terms(recipe, shape, adapter, *, sp: bool, c) -> dict[str, float]:
    """Activation + logits features of one training micro-batch on the heaviest stage."""
    par, train = recipe.parallel, recipe.train
    tokens = train.micro_batch_size * train.seq_length
    layers = shape.num_layers // par.pp
    in_flight = par.pp  # 1F1B: the first stage holds pp micro-batches
    per_layer = layer_terms(shape, tp=par.tp, sp=sp, seq=train.seq_length, adapter=adapter)
    rep_div = par.tp if sp else 1
    terms: dict[str, float] = {}
    if train.recompute == "full":
        terms["checkpoint_input"] = layers * in_flight * tokens * shape.hidden_size / rep_div
        terms["recompute_working_layers"] = tokens * _dot(c, per_layer)
    else:
        scale = layers * in_flight * tokens
        terms.update({name: scale * units for name, units in per_layer.items()})
        if train.recompute == "selective":
            terms["layer_attention_scores"] = 0.0  # megatron's selective recompute redoes core attention
    terms["head_replicated"] = in_flight * tokens * shape.hidden_size / rep_div
    width = DTYPE_BYTES[recipe.precision.dtype] / 2  # coefficients count bf16 values; fp32 stores twice
    terms = {name: units * width for name, units in terms.items()}
    terms[f"logits_{recipe.stage}"] = tokens * shape.vocab_size / par.tp
    return terms


def _train_items(recipe, shape, adapter, *, sp: bool, c) -> tuple[list[MemoryItem], dict]:
    train = recipe.train
    terms = train_terms(recipe, shape, adapter, sp=sp, c=c)
    logits_key = f"logits_{recipe.stage}"
    logits = getattr(c, logits_key) * terms[logits_key]
    activations = _dot(c, {k: v for k, v in terms.items() if k != logits_key})
    shape_note = f"micro-batch {train.micro_batch_size} x seq {train.seq_length}, recompute {train.recompute}"
    return [MemoryItem("activations", activations, "train",
                       f"{shape_note}, SP {'on' if sp else 'off'} (Korthikanti et al. terms, see module doc)"),
            MemoryItem("logits + loss temporaries", logits, "train",
                       f"{getattr(c, logits_key):g} B x tokens x vocab/tp ({shape.vocab_size // recipe.parallel.tp})")], terms


def _vllm_items(recipe, shape, *, dp: int, c, gpu_memory_gib: float, shortfalls: list[str]) -> list[MemoryItem]:
    """vLLM's share of one GPU: merged weights, workspace, KV cache (module docstring)."""
    grpo, tp = recipe.grpo, recipe.parallel.tp
    settings = grpo.rollout.vllm
    size = DTYPE_BYTES[recipe.precision.dtype]
    budget = settings.gpu_memory_utilization * gpu_memory_gib * GIB
    weights = sum(numel for numel, _ in rank_base_tensors(shape, tp=tp, pp=1)) * size
    workspace = c.vllm_workspace_gib * GIB
    kv = max(budget - weights - workspace, 0.0)
    per_token = shape.num_layers * 2 * max(shape.num_key_value_heads // tp, 1) * shape.head_dim * size
    tokens, seq_len = int(kv // per_token), grpo.data.max_prompt_length + grpo.sampling.max_new_tokens
    per_rank = grpo.prompts_per_step // dp * grpo.sampling.num_generations
    level = settings.sleep_level
    freed = {0: "static", 1: "rollout", 2: "rollout"}
    share_note = f"grpo.rollout.vllm.gpu_memory_utilization {settings.gpu_memory_utilization:g} x {gpu_memory_gib:g} GiB"
    items = [
        MemoryItem("vLLM weights (merged copy)", weights, "static" if level == 0 else "rollout",
                   f"the model's tensors on one TP rank in {recipe.precision.dtype}"
                   + {0: "", 1: "; sleep level 1 keeps them on the host between rollouts",
                      2: "; freed by sleep level 2 between rollouts, refilled by the push"}[level]),
        MemoryItem("vLLM workspace", workspace, freed[level], "forward activations, sampler, CUDA graph pools (of the share)"),
        MemoryItem("vLLM KV cache", kv, freed[level],
                   f"rest of {share_note}: {tokens:,} tokens = {tokens / seq_len:.1f} sequences of {seq_len} "
                   f"(a step samples {per_rank}; paged, so shorter completions share it)"),
    ]
    if level:
        items.append(MemoryItem("vLLM asleep", c.vllm_asleep_gib * GIB, "static", f"kept while sleeping (level {level})"))
    if level == 1:
        items.append(MemoryItem("vLLM weights on host", weights, "host", "sleep level 1 moves them to pinned host memory"))
    if tokens < seq_len:
        shortfalls.append(f"grpo.rollout.vllm.gpu_memory_utilization={settings.gpu_memory_utilization:g} leaves vLLM "
                          f"{kv / GIB:.2f} GiB of KV cache ({tokens:,} tokens) after its weights "
                          f"({weights / GIB:.1f} GiB) and workspace; one sequence of {seq_len} tokens needs "
                          f"{seq_len * per_token / GIB:.2f} GiB: raise it")
    return items


def plan_generator_memory(recipe, shape, *, gpu_memory_gib: float = 80.0,
                          coefficients: ActivationCoefficients | None = None) -> MemoryPlan:
    """The per-GPU plan of a generator rank of an asynchronous job (grpo.rollout.mode=async): vLLM
    alone, awake all the time (nothing to sleep for), at grpo.rollout.generator_tp."""
    c = coefficients or ActivationCoefficients()
    rollout = recipe.grpo.rollout
    settings = dataclasses.replace(rollout.vllm, sleep_level=0)
    sized = dataclasses.replace(recipe, parallel=dataclasses.replace(recipe.parallel, tp=rollout.generator_tp),
                                grpo=dataclasses.replace(recipe.grpo, rollout=dataclasses.replace(rollout, vllm=settings)))
    shortfalls: list[str] = []
    items = _vllm_items(sized, shape, dp=1, c=c, gpu_memory_gib=gpu_memory_gib, shortfalls=shortfalls)
    allocated = sum(i.bytes for i in items)
    items.append(MemoryItem("allocator headroom", c.fragmentation * allocated, "overhead",
                            f"{c.fragmentation:.0%} of the allocated peak (fragmentation)"))
    items.append(MemoryItem("CUDA context + NCCL", c.cuda_context_gib * GIB, "overhead",
                            "context, cuBLAS workspaces, NCCL buffers"))
    replicas = rollout.generator_ranks // rollout.generator_tp
    return MemoryPlan(recipe_name=f"{recipe.name} (generator ranks)", items=items, shortfalls=shortfalls,
                      layout=f"{rollout.generator_ranks} generator ranks = tp {rollout.generator_tp} x {replicas} "
                             f"vLLM replicas; {recipe.precision.dtype}", gpu_memory_bytes=gpu_memory_gib * GIB)


def _rollout_items(recipe, shape, adapter, *, dp: int, sp: bool, c, gpu_memory_gib: float,
                   shortfalls: list[str]) -> list[MemoryItem]:
    if recipe.stage != "grpo" or recipe.grpo.rollout.mode == "async":
        return []  # asynchronous rollouts: the trainer's GPUs hold no engine (plan_generator_memory)
    grpo, par = recipe.grpo, recipe.parallel
    if grpo.rollout.engine == "vllm":
        return _vllm_items(recipe, shape, dp=dp, c=c, gpu_memory_gib=gpu_memory_gib, shortfalls=shortfalls)
    per_rank = grpo.prompts_per_step // dp * grpo.sampling.num_generations
    batch = min(grpo.rollout.megatron.max_batch_size, per_rank)
    prompt, new = grpo.data.max_prompt_length, grpo.sampling.max_new_tokens
    kv_local = max(shape.num_key_value_heads // par.tp, 1) * shape.head_dim
    layers = shape.num_layers // par.pp
    size = DTYPE_BYTES[recipe.precision.dtype]
    items = []
    if grpo.rollout.engine == "megatron":
        kv = batch * (prompt + new) * layers * 2 * kv_local * size
        items.append(MemoryItem("rollout KV cache", kv, "rollout",
                                f"{batch} seqs (of {per_rank}) x {prompt + new} tokens x {layers} layers x 2 x "
                                f"{kv_local} x {size} B"))
    context = prompt if grpo.rollout.engine == "megatron" else prompt + new  # torch: full forward per token
    per_layer = layer_terms(shape, tp=par.tp, sp=sp, seq=context, adapter=adapter)
    prefill = c.rollout_prefill_layers * batch * context * _dot(c, per_layer)
    masks = 2 * batch * context * context  # bool [B, 1, q, k] mask and its complement
    logits = batch * shape.vocab_size * 4 * 2  # last-token logits gathered over TP, fp32, + sampling copy
    items.append(MemoryItem("rollout prefill", prefill + masks + logits, "rollout",
                            f"{c.rollout_prefill_layers:g} layer x {batch} x {context} tokens (no grad) + masks + logits"))
    return items


# ---- calibration -------------------------------------------------------------------------


def fit_coefficients(measurements: list[tuple[dict[str, float], float]], names: list[str],
                     base: ActivationCoefficients | None = None) -> ActivationCoefficients:
    """Least-squares fit of the coefficients `names` to measured dynamic bytes, the others
    held at `base`. Each measurement is (plan.train_terms, bytes): bytes is the GPU's peak
    allocated during a training step minus what was allocated before it. Terms of a full-
    recompute plan contain `recompute_working_layers` x layer bytes at the base values, so
    fit the layer coefficients from recompute=none runs first (see docs/MEMORY.md)."""
    import numpy as np

    base = base or ActivationCoefficients()
    if len(measurements) < len(names):
        raise ValueError(f"{len(measurements)} measurements cannot fit {len(names)} coefficients")
    matrix = np.array([[terms.get(n, 0.0) for n in names] for terms, _ in measurements])
    target = np.array([measured - sum(getattr(base, n) * units for n, units in terms.items() if n not in names)
                       for terms, measured in measurements])
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    return dataclasses.replace(base, **{n: float(v) for n, v in zip(names, solution)})
