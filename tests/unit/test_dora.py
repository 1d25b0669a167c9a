"""DoRA/rsLoRA adapter: config, fused-row layout, factored weight norm, dropout modes,
norm caching under activation recompute, merge/unmerge and adapter-only state dicts.

Layer-level checks run in one spawned single-rank gloo process (megatron's parallel state
stays out of the pytest process); references are hand computations from the formulas.
"""

import pytest
import torch

from gazal_nemo.convert.mapping import fuse_qkv, tp_slice
from gazal_nemo.models.qwen3 import Qwen3Shape
from gazal_nemo.peft.config import AdapterConfig
from gazal_nemo.peft.dora import fused_rows, lowrank_row_terms
from gazal_nemo.testing.fixed_dropout import FixedMask
from gazal_nemo.testing.multiproc import run_distributed

SHAPE = Qwen3Shape(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=3, rms_norm_eps=1e-6, rope_theta=1e6,
                   max_position_embeddings=32, tie_word_embeddings=False)


# ---- config -------------------------------------------------------------------------------

def test_config_defaults_are_the_paper_values():
    cfg = AdapterConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.use_dora, cfg.use_rslora) == (256, 512, 0.1, True, True)
    assert cfg.dropout_mode == "lowrank"
    assert cfg.scaling == 512 / 16  # rsLoRA: alpha / sqrt(r)
    assert AdapterConfig(rank=8, alpha=16, use_rslora=False).scaling == 2.0
    assert AdapterConfig(targets=["linear_qkv"]).targets == ("linear_qkv",)


@pytest.mark.parametrize("overrides,key", [
    (dict(rank=0), "adapter.rank"), (dict(alpha=-1), "adapter.alpha"), (dict(dropout=1.0), "adapter.dropout"),
    (dict(dropout_mode="fast"), "adapter.dropout_mode"), (dict(targets=("linear_out",)), "adapter.targets"),
    (dict(targets=()), "adapter.targets"), (dict(use_dora="yes"), "adapter.use_dora"),
])
def test_config_rejects_bad_values_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        AdapterConfig(**overrides)


# ---- fused row layout -------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2])
def test_fused_rows_follow_megatron_qkv_and_gate_up_layout(tp):
    torch.manual_seed(0)
    hidden, d = SHAPE.hidden_size, SHAPE.head_dim
    q, k, v = torch.randn(4 * d, hidden), torch.randn(2 * d, hidden), torch.randn(2 * d, hidden)
    fused = tp_slice(fuse_qkv(q, k, v, SHAPE), "qkv", tp - 1, tp)
    rows = fused_rows("linear_qkv", SHAPE, tp)
    for part, hf in zip(rows.split(fused), (q, k, v)):
        assert torch.equal(part.reshape(-1, hidden), hf.chunk(tp)[tp - 1])
    x = torch.randn(5, hidden)
    per_part = [x @ hf.chunk(tp)[tp - 1].t() for hf in (q, k, v)]
    assert torch.allclose(rows.join(per_part), x @ fused.t(), atol=1e-6)

    gate, up = torch.randn(12, hidden), torch.randn(12, hidden)
    fused = tp_slice(torch.cat([gate, up]), "gate_up", tp - 1, tp)
    rows = fused_rows("linear_fc1", SHAPE, tp)
    assert all(torch.equal(p.reshape(-1, hidden), hf.chunk(tp)[tp - 1])
               for p, hf in zip(rows.split(fused), (gate, up)))


# ---- the factored weight norm ------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-3)])
def test_factored_norm_equals_norm_of_the_adapted_matrix(dtype, tol):
    """||W + s·B·A|| rows from the GEMM-only formula vs forming the matrix in float64."""
    gen = torch.Generator().manual_seed(0)
    groups, rows, in_features, r, s = 3, 10, 64, 8, 5.7
    w = (0.2 * torch.randn(groups * rows, in_features, generator=gen)).to(dtype)
    a = (0.1 * torch.randn(r, in_features, generator=gen)).to(dtype)
    b = (0.1 * torch.randn(groups * rows, r, generator=gen)).to(dtype)
    w64, a64, b64 = w.double(), a.double(), b.double()
    expected = torch.linalg.norm(w64 + s * b64 @ a64, dim=1)
    assert (expected / torch.linalg.norm(w64, dim=1) - 1).abs().max() > 0.05  # the update matters
    w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
    ours = (w_sq + lowrank_row_terms(w.view(groups, rows, in_features), a, b, s)).sqrt()
    assert ours.dtype == torch.float32
    assert ((ours.double() - expected) / expected).abs().max().item() < tol


# ---- layer-level checks (one spawned rank) ---------------------------------------------------------

def _build(hf_dir, cfg, *, recompute=None, dtype=torch.float32):
    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.peft.dora import apply_adapter

    shape, model = qwen3_from_hf(hf_dir, recompute=recompute, params_dtype=dtype)
    if cfg is not None:
        apply_adapter(model, cfg, shape)
    return shape, model


@torch.no_grad()
def _randomize(model, seed):
    from gazal_nemo.peft.dora import adapted_layers

    gen = torch.Generator().manual_seed(seed)
    for layer in adapted_layers(model):
        for part in layer.rows.parts:
            layer.lora_A[part].copy_(0.05 * torch.randn(layer.lora_A[part].shape, generator=gen))
            layer.lora_B[part].copy_(0.05 * torch.randn(layer.lora_B[part].shape, generator=gen))
            if layer.use_dora:
                layer.magnitude[part].mul_(0.9 + 0.2 * torch.rand(layer.magnitude[part].shape, generator=gen))
        layer.invalidate_norm()


def _fused_delta_and_magnitude(layer, shape):
    """ΔW = B·A and m in the megatron layer's fused row layout, built with the converter's fusion."""
    deltas = [layer.lora_B[p] @ layer.lora_A[p] for p in layer.rows.parts]
    mags = [layer.magnitude[p][:, None] for p in layer.rows.parts] if layer.use_dora else None
    if layer.target == "linear_qkv":
        fuse = lambda ts: fuse_qkv(*ts, shape)  # noqa: E731
    else:
        fuse = lambda ts: torch.cat(ts)  # noqa: E731
    return fuse(deltas), (fuse(mags)[:, 0] if mags is not None else None)


def _hand_output(layer, shape, x, x_dropped, mode):
    """The documented formulas, computed from the dense adapted matrix."""
    w = layer.base.weight
    s = layer.scaling
    delta, m = _fused_delta_and_magnitude(layer, shape)
    wx, wxd, dxd = x @ w.t(), x_dropped @ w.t(), x_dropped @ delta.t()
    if not layer.use_dora:
        return wx + s * dxd
    g = m / torch.linalg.norm(w + s * delta, dim=1)
    if mode == "peft":
        return wx + (g - 1) * wxd + g * s * dxd
    return g * (wx + s * dxd)


def _check_dropout_modes(hf_dir, gen) -> dict:
    """A fixed mask through each layer kind, in each mode, DoRA and LoRA, vs the formulas."""
    from gazal_nemo.peft.dora import adapted_layers

    out = {}
    for mode, use_dora in (("peft", True), ("lowrank", True), ("lowrank", False)):
        shape, model = _build(hf_dir, AdapterConfig(rank=4, alpha=8, dropout=0.1, dropout_mode=mode, use_dora=use_dora))
        _randomize(model, seed=2)
        model.train()
        for layer in adapted_layers(model)[:4]:
            x = torch.randn(6, 2, layer.base.weight.shape[1], generator=gen)
            mask = (torch.rand(x.shape, generator=gen) >= 0.1).float() / 0.9
            layer.lora_dropout = FixedMask(mask)
            with torch.no_grad():
                got, bias = layer(x)
                expected = _hand_output(layer, shape, x, x * mask, mode)
                other = _hand_output(layer, shape, x, x * mask, "lowrank" if mode == "peft" else "peft")
            out[f"dropout/{mode}/dora={use_dora}/{layer.target}"] = dict(
                err=(got - expected).abs().max().item(), size=expected.abs().max().item(),
                mode_gap=(expected - other).abs().max().item(), bias=bias)
        model.eval()  # no dropout: both modes are (m/n)(W x + s·B·A·x)
        layer = adapted_layers(model)[0]
        x = torch.randn(6, 2, layer.base.weight.shape[1], generator=gen)
        with torch.no_grad():
            got, _ = layer(x)
        out[f"eval/{mode}/dora={use_dora}"] = (got - _hand_output(layer, shape, x, x, "lowrank")).abs().max().item()
    return out


def _check_norm_caching(hf_dir, ids, pos) -> dict:
    """Norm computations over 3 micro-batches with full recompute, then after invalidation."""
    from gazal_nemo.peft.dora import adapted_layers, invalidate_dora_norms

    out, grads = {}, {}
    for recompute in ("full", None):
        _, model = _build(hf_dir, AdapterConfig(rank=4, alpha=8, dropout=0.0), recompute=recompute)
        _randomize(model, seed=3)
        model.train()
        layers = adapted_layers(model)
        for micro in ids:
            model(micro, pos, None).float().logsumexp(-1).mean().backward()
        grads[recompute] = [p.grad.clone() for layer in layers for p in layer.parameters() if p.requires_grad]
    out["norms_after_3_microbatches"] = [layer.num_norm_computations for layer in layers]
    with torch.no_grad():
        model(ids[0], pos, None)
    out["norms_without_invalidate"] = [layer.num_norm_computations for layer in layers]
    invalidate_dora_norms(model)
    with torch.no_grad():
        model(ids[0], pos, None)
    out["norms_after_invalidate"] = [layer.num_norm_computations for layer in layers]
    out["recompute_grad_err"] = max((a - b).abs().max().item() for a, b in zip(grads["full"], grads[None]))
    out["grad_nonzero"] = all(g.abs().max() > 0 for g in grads["full"])
    return out


def _check_merge(hf_dir, ids, pos) -> dict:
    """Merge folds the adapter into W (same logits); unmerge restores W."""
    from gazal_nemo.peft.dora import adapted_layers, merge_adapter, unmerge_adapter

    _, model = _build(hf_dir, AdapterConfig(rank=4, alpha=8, dropout=0.0))
    _randomize(model, seed=4)
    model.eval()
    layers = adapted_layers(model)
    base = [layer.base.weight.detach().clone() for layer in layers]
    # merged_weight() (what a weight push and an export read) must leave W alone, fp32 W included.
    read = [layer.merged_weight() for layer in layers]
    read_moved_w = max((layer.base.weight - w).abs().max().item() for layer, w in zip(layers, base))
    with torch.no_grad():
        adapted = model(ids[0], pos, None)
        merge_adapter(model)
        merged = model(ids[0], pos, None)
        changed = min((layer.base.weight - w).abs().max().item() for layer, w in zip(layers, base))
        read_err = max((layer.base.weight - w).abs().max().item() for layer, w in zip(layers, read))
        unmerge_adapter(model)
        after = model(ids[0], pos, None)
    return dict(merge_changed_w=changed, merged_logits_err=(merged - adapted).abs().max().item(),
                merged_weight_moved_w=read_moved_w, merged_weight_err=read_err,
                unmerge_w_err=max((layer.base.weight - w).abs().max().item() for layer, w in zip(layers, base)),
                unmerge_logits_err=(after - adapted).abs().max().item())


def _check_bf16_init(hf_dir, ids, pos) -> dict:
    """bf16: at initialisation (B = 0) the adapted model is the base model, bit for bit."""
    from gazal_nemo.peft.dora import adapter_parameters, apply_adapter

    shape, model = _build(hf_dir, None, dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        base_logits = model(ids[0], pos, None)
        apply_adapter(model, AdapterConfig(rank=4, alpha=8), shape)
        gap = (model(ids[0], pos, None).float() - base_logits.float()).abs().max().item()
    return dict(bf16_init_gap=gap, bf16_dtypes=sorted({str(p.dtype) for p in adapter_parameters(model)}))


def _check_state_dict(hf_dir) -> dict:
    """Adapter-only state dict: small, round-trips, refuses mismatches."""
    from gazal_nemo.peft.dora import adapted_layers, adapter_state_dict, load_adapter_state_dict

    _, model = _build(hf_dir, AdapterConfig(rank=4, alpha=8, dropout=0.0))
    _randomize(model, seed=4)
    state = adapter_state_dict(model)
    out = dict(state_keys=sorted(state), state_numel=sum(v.numel() for v in state.values()),
               model_numel=sum(p.numel() for p in model.parameters()))
    with torch.no_grad():
        for layer in adapted_layers(model):
            for p in layer.lora_B.values():
                p.zero_()
    load_adapter_state_dict(model, state)
    out["roundtrip_equal"] = all(torch.equal(a, b) for a, b in zip(adapter_state_dict(model).values(), state.values()))
    errors = []
    for bad in ({**state, "decoder.layers.9.mlp.linear_fc2.lora_A.down": state[next(iter(state))]},
                {k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(state.items())}):
        try:
            load_adapter_state_dict(model, bad)
        except ValueError as err:
            errors.append(str(err))
    out["load_errors"] = errors
    return out


def _layer_checks(hf_dir):
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=1)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (3, 2, 10), generator=gen)
    pos = torch.arange(10).unsqueeze(0).expand(2, 10)
    return {**_check_dropout_modes(hf_dir, gen), **_check_norm_caching(hf_dir, ids, pos),
            **_check_merge(hf_dir, ids, pos), **_check_bf16_init(hf_dir, ids, pos), **_check_state_dict(hf_dir)}


@pytest.fixture(scope="module")
def layer_results(tiny_hf_dir):
    return run_distributed(_layer_checks, 1, str(tiny_hf_dir))[0]


def test_dropout_modes_match_their_formulas(layer_results):
    dropout = {k: v for k, v in layer_results.items() if k.startswith("dropout/")}
    assert len(dropout) == 12  # 3 configurations x (qkv, proj, fc1, fc2)
    for key, r in dropout.items():
        assert r["err"] < 1e-5 * max(1.0, r["size"]), key
        assert r["bias"] is None
        if "dora=True" in key:
            assert r["mode_gap"] > 1e-3, key  # the two DoRA modes really differ with dropout on
    for key in ("eval/peft/dora=True", "eval/lowrank/dora=True", "eval/lowrank/dora=False"):
        assert layer_results[key] < 1e-5, key


def test_norm_is_computed_once_per_optimizer_step_with_recompute(layer_results):
    assert layer_results["norms_after_3_microbatches"] == [1] * 8
    assert layer_results["norms_without_invalidate"] == [1] * 8
    assert layer_results["norms_after_invalidate"] == [2] * 8
    assert layer_results["grad_nonzero"]  # frozen embedding + recompute still reaches the adapters
    assert layer_results["recompute_grad_err"] < 1e-6


def test_merge_then_unmerge(layer_results):
    assert layer_results["merge_changed_w"] > 1e-3
    assert layer_results["merged_weight_moved_w"] == 0.0  # reading the merged weight does not merge it
    assert layer_results["merged_weight_err"] < 1e-6
    assert layer_results["merged_logits_err"] < 1e-4
    assert layer_results["unmerge_w_err"] < 1e-6  # float32 weights
    assert layer_results["unmerge_logits_err"] < 1e-4


def test_bf16_adapted_model_starts_exactly_at_the_base_model(layer_results):
    assert layer_results["bf16_init_gap"] == 0.0
    assert layer_results["bf16_dtypes"] == ["torch.bfloat16", "torch.float32"]  # A, B in W's dtype; m fp32


def test_adapter_state_dict_is_adapter_only_and_strict(layer_results):
    keys = layer_results["state_keys"]
    assert len(keys) == 2 * 7 * 3
    assert "decoder.layers.0.self_attention.linear_qkv.lora_A.q" in keys
    assert "decoder.layers.1.mlp.linear_fc1.magnitude.gate" in keys
    assert layer_results["state_numel"] < layer_results["model_numel"] / 5
    assert layer_results["roundtrip_equal"]
    unexpected, shape = layer_results["load_errors"]
    assert "unexpected keys" in unexpected and "layers.9" in unexpected
    assert "has shape" in shape
