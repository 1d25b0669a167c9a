"""DoRA/LoRA on megatron vs Hugging Face PEFT, at TP=1, TP=2 and PP=2 (gloo, float32).

The reference is PEFT's LoraConfig(use_dora, use_rslora, target_modules="all-linear") on
transformers' Qwen3 with random A, B and magnitude (so outputs and gradients are
non-trivial). Each rank builds our megatron model from the same HF folder, loads the same
adapter tensors (TP-sliced), and returns logits, the loss, adapter gradients under PEFT's
names, the exported PEFT folder and the merged weights under HF names.
"""

import copy

import pytest
import torch

from gazal_nemo.testing.fixed_dropout import FixedMask
from gazal_nemo.testing.multiproc import run_distributed

RANK, ALPHA, SEQ = 8, 16, 12


def _peft_key(param_name: str) -> str:
    """PEFT parameter name -> its key in adapter_model.safetensors."""
    key = param_name.replace(".default", "")
    return key[: -len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key


HF_PARTS = {"linear_qkv": ("self_attn", ("q", "k", "v")), "linear_proj": ("self_attn", ("o",)),
            "linear_fc1": ("mlp", ("gate", "up")), "linear_fc2": ("mlp", ("down",))}


def _dropout_masks(hf_dir, ids, seed=5):
    """One [batch, seq, in] mask per megatron layer (q/k/v share one, so do gate/up), p = 0.1."""
    from gazal_nemo.models.qwen3 import Qwen3Shape

    shape = Qwen3Shape.from_pretrained(hf_dir)
    widths = {"linear_qkv": shape.hidden_size, "linear_proj": shape.num_attention_heads * shape.head_dim,
              "linear_fc1": shape.hidden_size, "linear_fc2": shape.intermediate_size}
    gen = torch.Generator().manual_seed(seed)
    return {(i, t): (torch.rand(*ids.shape, w, generator=gen) >= 0.1).float() / 0.9
            for i in range(shape.num_layers) for t, w in widths.items()}


def _peft_modules(layer_index, target):
    block, parts = HF_PARTS[target]
    return [f"model.layers.{layer_index}.{block}.{p}_proj" for p in parts]


def _peft_reference(hf_dir, *, use_dora: bool, seed: int = 0, masks=None):
    """PEFT model with random adapter tensors; its logits, loss and adapter grads on a fixed batch.

    With `masks`, PEFT runs in training mode with each projection's dropout replaced by its
    fixed mask (PEFT's own DoRA dropout path, with the extra base GEMM).
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=use_dora, use_rslora=True,
                                          target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(0.9 + 0.2 * torch.rand(p.shape, generator=gen))  # m != ||W + sBA||
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ), generator=gen)
    if masks is not None:
        modules = dict(model.base_model.model.named_modules())
        for (i, target), mask in masks.items():
            for name in _peft_modules(i, target):
                modules[name].lora_dropout["default"] = FixedMask(mask)
        model.train()
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {_peft_key(n): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    return dict(ids=ids, logits=logits.detach(), loss=loss.item(), grads=grads, state=state, merged=merged)


def _our_model(hf_dir, tp, pp, use_dora, *, dropout=0.0, dropout_mode="lowrank", init=True):

    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.peft.config import AdapterConfig
    from gazal_nemo.peft.dora import apply_adapter

    if init:
        init_parallel(tp=tp, pp=pp)
    shape, model = qwen3_from_hf(hf_dir, tp=tp, pp=pp)
    cfg = AdapterConfig(rank=RANK, alpha=ALPHA, dropout=dropout, dropout_mode=dropout_mode, use_dora=use_dora,
                        use_rslora=True)
    params = apply_adapter(model, cfg, shape)
    return shape, model, cfg, params


def _loss_and_grads(model, shape, ids):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from gazal_nemo.peft.export import peft_state_dict
    from gazal_nemo.training.model_io import gather_vocab_logits

    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    logits = model(ids, pos, None)
    loss = vocab_parallel_cross_entropy(logits[:, :-1].float().contiguous(), ids[:, 1:].contiguous()).mean()
    loss.backward()
    grads = peft_state_dict(model, shape, tensor_of=lambda p: p.grad)
    return gather_vocab_logits(logits), loss.item(), grads


def _replicated_grads_agree(model) -> float:
    """Max difference across TP ranks of the grads of replicated adapter tensors (must be 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from gazal_nemo.peft.dora import adapter_parameters

    worst = 0.0
    for p in adapter_parameters(model):
        if not p.tensor_model_parallel:
            parts = [torch.empty_like(p.grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, p.grad.contiguous(), group=ps.get_tensor_model_parallel_group())
            worst = max(worst, max((q - parts[0]).abs().max().item() for q in parts))
    return worst


def _megatron_run(hf_dir, ids, state, tp, use_dora, out_dir, masks=None):
    """Forward + backward with PEFT's adapter tensors; returns what rank 0 gathered.

    With `masks`, a second model runs dropout_mode="peft" in training mode with the same
    fixed masks as the PEFT reference (row-parallel layers get their input slice of it).
    """
    from megatron.core import parallel_state as ps

    from gazal_nemo.peft.dora import adapted_layers
    from gazal_nemo.peft.export import export_peft_adapter, load_peft_state_dict, merged_hf_state_dict

    shape, model, cfg, params = _our_model(hf_dir, tp, 1, use_dora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    load_peft_state_dict(model, shape, state)
    logits, loss, grads = _loss_and_grads(model, shape, ids)
    adapter_dir = export_peft_adapter(model, cfg, shape, f"{out_dir}/adapter", base_model_name_or_path=str(hf_dir))
    merged = merged_hf_state_dict(model, shape)
    sharded = model.sharded_state_dict()
    sharded_keys = sorted(sharded)
    adapter_shapes = {k: tuple(v.global_shape) for k, v in sharded.items() if ".lora_" in k or ".magnitude." in k}
    out = dict(logits=logits, loss=loss, grads=grads, merged=merged, adapter_dir=str(adapter_dir),
               trainable=trainable, num_params=len(params), sharded_keys=sharded_keys, adapter_shapes=adapter_shapes,
               replicated_grad_gap=_replicated_grads_agree(model))
    if masks is not None:
        shape, model, _, _ = _our_model(hf_dir, tp, 1, use_dora, dropout=0.1, dropout_mode="peft", init=False)
        load_peft_state_dict(model, shape, state)
        model.train()
        for layer in adapted_layers(model):
            mask = masks[(layer.layer_index, layer.target)].transpose(0, 1)  # megatron is [seq, batch, in]
            if layer.spec.parallel == "row":
                mask = mask.chunk(tp, dim=-1)[ps.get_tensor_model_parallel_rank()]
            layer.lora_dropout = FixedMask(mask.contiguous())
        logits, loss, grads = _loss_and_grads(model, shape, ids)
        out["dropout"] = dict(logits=logits, loss=loss, grads=grads, replicated_grad_gap=_replicated_grads_agree(model))
    return out


def _rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _assert_matches(ours, ref, what):
    assert (ours["logits"] - ref["logits"]).abs().max().item() < 1e-4, what
    assert abs(ours["loss"] - ref["loss"]) < 1e-5, what
    assert set(ours["grads"]) == set(ref["grads"]) == set(ref["state"]), what
    for key, ref_grad in ref["grads"].items():
        assert ref_grad.abs().max() > 0, key
        err = _rel_err(ours["grads"][key], ref_grad)
        assert err < 1e-4, f"{what} {key}: relative grad error {err}"
    assert ours["replicated_grad_gap"] == 0.0, what  # replicated A (column) / B, m (row) stay in sync


@pytest.mark.parametrize("tp,use_dora", [(1, True), (2, True), (2, False)])
def test_matches_peft_forward_grads_export_merge(tiny_hf_dir, tmp_path, tp, use_dora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = _peft_reference(tiny_hf_dir, use_dora=use_dora)
    masks = _dropout_masks(tiny_hf_dir, ref["ids"]) if use_dora else None
    ref_dropout = _peft_reference(tiny_hf_dir, use_dora=use_dora, masks=masks) if use_dora else None
    results = run_distributed(_megatron_run, tp, str(tiny_hf_dir), ref["ids"], ref["state"], tp, use_dora,
                              str(tmp_path), masks)
    ours = results[0]
    # Only adapter parameters train: 2 layers x 7 projections x (A, B[, m]).
    per_projection = 3 if use_dora else 2
    assert ours["num_params"] == 2 * 7 * per_projection == len(ours["trainable"])
    assert all(".lora_" in n or ".magnitude." in n for n in ours["trainable"])

    _assert_matches(ours, ref, f"tp={tp} dropout=0")
    projections = {k.split(".")[-3 if k.endswith(".weight") else -2] for k in ref["grads"]}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(k.endswith("lora_magnitude_vector") for k in ref["grads"]) == use_dora
    if use_dora:  # PEFT's dropout semantics (dropout_mode="peft") with the same masks
        assert (ref_dropout["logits"] - ref["logits"]).abs().max() > 1e-2  # the masks matter
        _assert_matches(ours["dropout"], ref_dropout, f"tp={tp} dropout=peft")

    # The exported folder loads into PEFT and gives our logits.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(fresh, ours["adapter_dir"]).eval()
    with torch.no_grad():
        loaded_logits = loaded(ref["ids"]).logits
    assert (loaded_logits - ours["logits"]).abs().max().item() < 1e-4
    assert loaded.peft_config["default"].use_dora == use_dora

    # Merged weights under HF names equal PEFT's merge_and_unload.
    assert set(ours["merged"]) == set(ref["merged"])
    for name, ref_w in ref["merged"].items():
        assert _rel_err(ours["merged"][name], ref_w) < 1e-5, name

    # Base weights keep their unadapted dist-checkpoint keys; adapter tensors add their own.
    keys = ours["sharded_keys"]
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys
    assert "decoder.layers.1.mlp.linear_fc2.lora_B.down" in keys
    assert not any(".base." in k for k in keys)
    # Global shapes whatever the TP split, layers stacked first (tiny: 2 layers, 4 heads x 16, ffn 128).
    shapes = ours["adapter_shapes"]
    prefix = "decoder.layers.0."
    assert shapes[prefix + "self_attention.linear_qkv.lora_B.q"] == (2, 64, RANK)
    assert shapes[prefix + "self_attention.linear_qkv.lora_A.k"] == (2, RANK, 64)
    assert shapes[prefix + "self_attention.linear_proj.lora_A.o"] == (2, RANK, 64)
    assert shapes[prefix + "mlp.linear_fc1.lora_B.up"] == (2, 128, RANK)
    assert shapes[prefix + "mlp.linear_fc2.lora_A.down"] == (2, RANK, 128)
    if use_dora:
        assert shapes[prefix + "mlp.linear_fc1.magnitude.gate"] == (2, 128)
        assert shapes[prefix + "mlp.linear_fc2.magnitude.down"] == (2, 64)


def _pp_export(hf_dir, state, out_dir):
    from gazal_nemo.peft.export import export_peft_adapter, load_peft_state_dict, merged_hf_state_dict

    shape, model, cfg, _ = _our_model(hf_dir, 1, 2, True)
    load_peft_state_dict(model, shape, state)
    adapter_dir = export_peft_adapter(model, cfg, shape, f"{out_dir}/adapter", base_model_name_or_path=str(hf_dir))
    return dict(adapter_dir=str(adapter_dir), merged=merged_hf_state_dict(model, shape))


def test_pipeline_parallel_export_gathers_every_stage(tiny_hf_dir_tied, tmp_path):
    """PP=2, tied embeddings: each stage holds 2 of 4 layers; rank 0 writes all of them."""
    from safetensors.torch import load_file

    ref = _peft_reference(tiny_hf_dir_tied, use_dora=True, seed=1)
    results = run_distributed(_pp_export, 2, str(tiny_hf_dir_tied), ref["state"], str(tmp_path))
    exported = load_file(f"{results[0]['adapter_dir']}/adapter_model.safetensors")
    assert set(exported) == set(ref["state"])
    assert any(".layers.3." in k for k in exported) and any(".layers.0." in k for k in exported)
    for key, value in ref["state"].items():
        assert torch.equal(exported[key], value), key
    merged = results[0]["merged"]
    assert results[1]["merged"] is None
    assert set(merged) == set(ref["merged"]) - {"lm_head.weight"} | {"model.embed_tokens.weight"}
    for name, value in merged.items():
        assert _rel_err(value, ref["merged"][name]) < 1e-5, name


# ---- sequence parallelism: a column -> row pair of raw megatron linears at TP=2 ----------------------

SP_SEQ, SP_HIDDEN, SP_FFN = 8, 8, 12  # fc1 holds [gate; up] (SP_FFN / 2 rows each) and feeds fc2 directly
# fc1's output on TP rank r is [gate_r; up_r]; fc2's input columns follow that rank order.
SP_RANK_ORDER = [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]


def _sp_tensors(seed=7):
    """Dense weights, adapter tensors, input, loss weights and dropout masks (float64)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    half = SP_FFN // 2
    t = dict(w1=rand(SP_FFN, SP_HIDDEN), w2=rand(SP_HIDDEN, SP_FFN), x=rand(SP_SEQ, 1, SP_HIDDEN),
             out_weights=rand(SP_SEQ, 1, SP_HIDDEN))
    for part, rows, cols in (("gate", half, SP_HIDDEN), ("up", half, SP_HIDDEN), ("down", SP_HIDDEN, SP_FFN)):
        t[f"A.{part}"], t[f"B.{part}"] = 0.3 * rand(4, cols), 0.3 * rand(rows, 4)
        t[f"m.{part}"] = 1 + torch.rand(rows, generator=gen, dtype=torch.float64)
    t["mask1"] = (torch.rand(SP_SEQ, 1, SP_HIDDEN, generator=gen) >= 0.1).double() / 0.9
    t["mask2"] = (torch.rand(SP_SEQ, 1, SP_FFN, generator=gen) >= 0.1).double() / 0.9
    return t


def _dense_dora(x, w, parts, s, mask, mode):
    """The documented formulas on whole matrices; parts = [(A, B, m)] in row order."""
    delta = torch.cat([b @ a for a, b, _ in parts])
    g = torch.cat([m for _, _, m in parts]) / torch.linalg.norm(w + s * delta, dim=1).detach()
    xd = x * mask
    if mode == "peft":
        return x @ w.t() + (g - 1) * (xd @ w.t()) + g * s * (xd @ delta.t())
    return g * (x @ w.t() + s * (xd @ delta.t()))


def _sp_reference(t, mode, s):
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items() if k[:2] in ("A.", "B.", "m.") or k == "x"}
    parts = lambda names: [(leaves[f"A.{p}"], leaves[f"B.{p}"], leaves[f"m.{p}"]) for p in names]  # noqa: E731
    h = _dense_dora(leaves["x"], t["w1"], parts(("gate", "up")), s, t["mask1"], mode)
    y = _dense_dora(h[..., SP_RANK_ORDER], t["w2"], parts(("down",)), s, t["mask2"], mode)
    (y * t["out_weights"]).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def _sp_worker(t, mode):
    """Our adapter on raw ColumnParallelLinear/RowParallelLinear with sequence_parallel=True."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.peft.config import AdapterConfig
    from gazal_nemo.peft.dora import AdaptedLinear, FusedRows

    init_parallel(tp=2)
    rank, half = ps.get_tensor_model_parallel_rank(), SP_FFN // 2
    config = TransformerConfig(num_layers=1, hidden_size=SP_HIDDEN, num_attention_heads=2, tensor_model_parallel_size=2,
                               sequence_parallel=True, use_cpu_initialization=True, gradient_accumulation_fusion=False)
    col = ColumnParallelLinear(SP_HIDDEN, SP_FFN, config=config, init_method=torch.nn.init.zeros_, bias=False,
                               gather_output=False)
    row = RowParallelLinear(SP_FFN, SP_HIDDEN, config=config, init_method=torch.nn.init.zeros_, bias=False,
                            input_is_parallel=True, skip_bias_add=True)
    f32 = {k: v.float() for k, v in t.items()}
    with torch.no_grad():
        gate, up = f32["w1"].chunk(2)
        col.weight.copy_(torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
        row.weight.copy_(f32["w2"].chunk(2, dim=1)[rank])
    cfg = AdapterConfig(rank=4, alpha=8, dropout=0.1, dropout_mode=mode)
    fc1 = AdaptedLinear(col, target="linear_fc1", rows=FusedRows(("gate", "up"), (half // 2, half // 2), 1), cfg=cfg,
                        layer_index=0)
    fc2 = AdaptedLinear(row, target="linear_fc2", rows=FusedRows(("down",), (SP_HIDDEN,), 1), cfg=cfg, layer_index=0)
    with torch.no_grad():
        for layer, part in ((fc1, "gate"), (fc1, "up"), (fc2, "down")):
            row_parallel = part == "down"
            layer.lora_A[part].copy_(f32[f"A.{part}"].chunk(2, dim=1)[rank] if row_parallel else f32[f"A.{part}"])
            layer.lora_B[part].copy_(f32[f"B.{part}"] if row_parallel else f32[f"B.{part}"].chunk(2)[rank])
            layer.magnitude[part].copy_(f32[f"m.{part}"] if row_parallel else f32[f"m.{part}"].chunk(2)[rank])
            layer.invalidate_norm()
    fc1.lora_dropout = FixedMask(f32["mask1"])  # the column layer sees the gathered sequence
    fc2.lora_dropout = FixedMask(f32["mask2"].chunk(2, dim=-1)[rank])  # the row layer its input slice
    fc1.train(), fc2.train()
    x = f32["x"].chunk(2)[rank].clone().requires_grad_(True)  # sequence-sharded input
    y, _ = fc2(fc1(x)[0])
    (y * f32["out_weights"].chunk(2)[rank]).sum().backward()
    grads = {"x": x.grad}
    for layer in (fc1, fc2):
        for kind, params in (("A", layer.lora_A), ("B", layer.lora_B), ("m", layer.magnitude)):
            for part, p in params.items():
                if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads does
                    dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
                grads[f"{kind}.{part}"] = p.grad.clone()
    return y.detach(), grads


@pytest.mark.parametrize("mode", ["lowrank", "peft"])
def test_sequence_parallel_column_row_pair_matches_dense_formulas(mode):
    """TP=2 with sequence parallelism: gathered input for column layers, reduce-scatter for row layers."""
    from gazal_nemo.convert.mapping import tp_gather

    t = _sp_tensors()
    ref_y, ref_grads = _sp_reference(t, mode, s=8 / 4 ** 0.5)
    results = run_distributed(_sp_worker, 2, t, mode)
    y = torch.cat([r[0] for r in results])
    assert _rel_err(y.double(), ref_y) < 1e-5
    layouts = {"x": "col", "A.gate": "rep", "A.up": "rep", "B.gate": "col", "B.up": "col", "m.gate": "col",
               "m.up": "col", "A.down": "row", "B.down": "rep", "m.down": "rep"}
    for name, layout in layouts.items():
        ours = tp_gather([r[1][name] for r in results], layout).double()
        assert _rel_err(ours, ref_grads[name]) < 1e-5, name
        if layout == "rep":
            assert torch.equal(results[0][1][name], results[1][1][name]), name
