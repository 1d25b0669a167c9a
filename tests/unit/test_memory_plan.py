"""The memory plan: static items against the bytes megatron really allocates on CPU, the
`gazal plan` verdicts for the 32B recipes, the dry run, the new memory keys, calibration."""

import json
import re

import pytest
import torch

from gazal_nemo.testing.multiproc import run_distributed
from gazal_nemo.testing.tiny import QWEN3_32B_CONFIG

TINY_RECIPE = "recipes/tiny_cpu_sft.yaml"
# megatron pads DDP buffers (param starts to 64 elements, the end to lcm(dp, 128)) and the
# plan models that padding: weights, adapter and gradients come out exact. The optimizer
# holds the params' own elements; at dp > 1 a rank's shard also owns whatever alignment
# gaps fall in its range, which the plan spreads evenly (0.035% on the tiny model's rank 0).
STATIC_TOLERANCE = 0.002


@pytest.fixture(scope="module")
def qwen3_32b_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_32b_config")
    (folder / "config.json").write_text(json.dumps(QWEN3_32B_CONFIG))
    return folder


# ---- static items vs megatron's real allocations ------------------------------------------


def _storage_bytes(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _measure_static(hf_dir: str, cases: list[list[str]]) -> list[tuple[dict, dict]]:
    """Per case: (bytes measured on the built model, DDP and optimizer after one step, plan items)."""
    from gazal_nemo.models.qwen3 import Qwen3Shape
    from gazal_nemo.parallel import init_parallel, launch_env
    from gazal_nemo.peft.dora import AdaptedLinear
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.training.memory_plan import plan_memory
    from gazal_nemo.training.model_setup import build_train_model, unwrap
    from gazal_nemo.training.optim import build_optimizer, inner_optimizers

    init_parallel(tp=1)
    results = []
    for overrides in cases:
        recipe = load_recipe(TINY_RECIPE, [f"model.hf_path={hf_dir}", *overrides])
        tm = build_train_model(recipe.model, recipe.parallel, recipe.precision, recipe.train, adapter_cfg=recipe.adapter)
        optimizer = build_optimizer(tm.chunks, recipe.optim, recipe.precision,
                                    distributed=recipe.parallel.distributed_optimizer)
        chunk, model = tm.chunks[0], unwrap(tm.chunks[0])
        ids = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
        chunk.zero_grad_buffer()
        optimizer.zero_grad()
        chunk(ids, torch.arange(32).expand_as(ids), None).float().logsumexp(-1).mean().backward()
        chunk.finish_grad_sync()
        optimizer.step()  # creates the moments
        trainable = _storage_bytes(p for p in model.parameters() if p.requires_grad)
        frozen = _storage_bytes(p for p in model.parameters() if not p.requires_grad)
        states, mains = {}, {}
        for wrapper in inner_optimizers(optimizer):
            for group in wrapper.optimizer.param_groups:
                mains.update(_storage_bytes(p for p in group["params"]
                                            if p.untyped_storage().data_ptr() not in trainable))
            for state in wrapper.optimizer.state.values():
                states.update(_storage_bytes(v for v in state.values() if torch.is_tensor(v) and v.numel() > 1))
        caches = [t for m in model.modules() if isinstance(m, AdaptedLinear)
                  for t in (m._norm_O, m._weight_sq[1]) if t is not None]
        cache_bytes = sum(t.nbytes for t in caches)
        measured = {
            "weights": sum(frozen.values()) + (0 if recipe.adapter else sum(trainable.values())),
            "gradients": sum(b.grad_data.nbytes for b in chunk.buffers),
            "optimizer states + main params": sum(states.values()) + sum(mains.values()),
        }
        if recipe.adapter:
            measured["adapter"] = sum(trainable.values()) + cache_bytes
        plan = plan_memory(recipe, Qwen3Shape.from_pretrained(hf_dir), world_size=launch_env().world_size,
                           use_te=False)
        after_step = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
        measured["overlap_grad_reduce"] = chunk.ddp_config.overlap_grad_reduce
        measured["params_after_step"] = after_step
        results.append((measured, {item.name: item.bytes for item in plan.items}))
    return results


def _check_static(measured: dict, planned: dict) -> None:
    measured = {k: v for k, v in measured.items() if k not in ("overlap_grad_reduce", "params_after_step")}
    assert set(measured) <= set(planned), (measured, planned)
    for name, real in measured.items():
        assert real > 0, name
        assert abs(planned[name] - real) <= STATIC_TOLERANCE * real, f"{name}: plan {planned[name]} B, allocated {real} B"


STATIC_CASES = [["precision.dtype=bf16", "adapter=null"],          # full parameters: fp32 main params
                ["precision.dtype=bf16"],                          # DoRA on a frozen bf16 base
                ["precision.dtype=bf16", "adapter=null", "precision.grad_reduce_in_fp32=false",
                 "parallel.distributed_optimizer=false"],          # bf16 grads, unsharded mixed-precision optimizer
                ["precision.dtype=bf16", "adapter=null", "parallel.overlap_grad_reduce=false"]]  # vs case 0


@pytest.mark.slow
def test_static_items_match_allocated_bytes_at_two_data_parallel_ranks(tiny_hf_dir):
    for results in run_distributed(_measure_static, 2, str(tiny_hf_dir), STATIC_CASES):
        for (measured, planned), overrides in zip(results, STATIC_CASES):
            _check_static(measured, planned)
            whole = _item(_plan(TINY_RECIPE, [f"model.hf_path={tiny_hf_dir}", *overrides], tiny_hf_dir,
                                world_size=1, use_te=False), "optimizer states + main params")
            sharded = "parallel.distributed_optimizer=false" not in overrides
            # The distributed optimizer really halves what each rank holds; the plain one does not.
            assert (measured["optimizer states + main params"] < 0.55 * whole) == sharded, (overrides, whole)
        # DDP overlaps the gradient reduce-scatter with backward by default at dp=2, with the same step.
        overlapped, serial = results[0][0], results[3][0]
        assert overlapped["overlap_grad_reduce"] and not serial["overlap_grad_reduce"]
        assert torch.equal(overlapped["params_after_step"], serial["params_after_step"])


def _plan(recipe_path, overrides, model_dir, *, world_size, **kwargs):
    from gazal_nemo.models.qwen3 import Qwen3Shape
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.training.memory_plan import plan_memory

    recipe = load_recipe(recipe_path, overrides)
    return plan_memory(recipe, Qwen3Shape.from_pretrained(model_dir), world_size=world_size, **kwargs)


def _item(plan, name: str) -> float:
    return next(item.bytes for item in plan.items if item.name == name)


# ---- gazal plan on the 32B recipes -----------------------------------------------------------


def _gazal(*argv: str, monkeypatch=None) -> tuple[int, str, str]:
    import contextlib
    import io

    from gazal_nemo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("te", ["off", "on"])
def test_shipped_32b_recipes_fit_8_and_2_h100(qwen3_32b_dir, no_launcher, te):
    for recipe, world in [("recipes/grpo_qwen3_32b.yaml", 8), ("recipes/grpo_qwen3_32b_dora.yaml", 8),
                          ("recipes/sft_qwen3_32b_dora.yaml", 2)]:
        code, out, _ = _gazal("plan", "--te", te, "--recipe", recipe, f"model.hf_path={qwen3_32b_dir}")
        assert f"world {world} = tp {world}" in out  # default world: the recipe's tp*pp*cp
        assert code == 0 and "FITS:" in out, out


def test_old_grpo_settings_do_not_fit_and_name_the_largest_item(qwen3_32b_dir, no_launcher):
    old = ["train.micro_batch_size=4", "grpo.rollout.engine=megatron", "grpo.rollout.megatron.max_batch_size=128",
           "precision.grad_reduce_in_fp32=true"]
    code, out, _ = _gazal("plan", "--world-size", "8", "--recipe", "recipes/grpo_qwen3_32b.yaml",
                          f"model.hf_path={qwen3_32b_dir}", *old)
    assert code == 1, out
    assert "DOES NOT FIT" in out and "largest item: optimizer states + main params (45.8 GiB)" in out
    weights = re.search(r"^weights\s+static\s+([\d.]+)", out, re.M)
    assert weights and abs(float(weights.group(1)) - 8.19e9 / 2**30) < 0.05  # 4.1B params x 2 B, the 8.2 GB
    # Two nodes shard the optimizer over dp=2 and halve it.
    code, out, _ = _gazal("plan", "--nodes", "2", "--recipe", "recipes/grpo_qwen3_32b.yaml",
                          f"model.hf_path={qwen3_32b_dir}", *old)
    assert "dp 2" in out and re.search(r"^optimizer states \+ main params\s+static\s+22\.8\d", out, re.M), out


def test_vllm_share_is_weights_workspace_and_kv_cache_and_a_budget_without_room_is_refused(qwen3_32b_dir):
    code, out, _ = _gazal("plan", "--world-size", "8", "--te", "on", "--recipe", "recipes/grpo_qwen3_32b.yaml",
                          f"model.hf_path={qwen3_32b_dir}")
    assert code == 0, out
    # The merged bf16 copy on one TP rank is exactly the trainer's bf16 weights (4.096B params x 2 B).
    weights = re.search(r"^weights\s+static\s+([\d.]+)", out, re.M).group(1)
    assert re.search(rf"^vLLM weights \(merged copy\)\s+rollout\s+{weights}", out, re.M), out
    kv = re.search(r"^vLLM KV cache\s+rollout\s+([\d.]+).*: ([\d,]+) tokens", out, re.M)
    per_token = 64 * 2 * 1 * 128 * 2  # layers x (k, v) x kv heads per TP rank x head_dim x bf16
    assert abs(int(kv.group(2).replace(",", "")) * per_token / 2**30 - float(kv.group(1))) < 0.01
    assert float(kv.group(1)) == pytest.approx(0.16 * 80 - float(weights) - 1.5, abs=0.01)
    assert re.search(r"^vLLM asleep\s+static", out, re.M)  # sleep level 2: the rest is rollout-phase only
    code, out, _ = _gazal("plan", "--world-size", "8", "--te", "on", "--recipe", "recipes/grpo_qwen3_32b.yaml",
                          f"model.hf_path={qwen3_32b_dir}", "grpo.rollout.vllm.gpu_memory_utilization=0.11")
    assert code == 1 and "DOES NOT FIT: grpo.rollout.vllm.gpu_memory_utilization=0.11 leaves vLLM" in out, out


def test_cpu_offload_moves_the_optimizer_to_the_host_in_the_plan(qwen3_32b_dir):
    code, out, _ = _gazal("plan", "--world-size", "8", "--te", "on", "--recipe", "recipes/grpo_qwen3_32b.yaml",
                          f"model.hf_path={qwen3_32b_dir}", "optim.cpu_offload_fraction=1",
                          "precision.grad_reduce_in_fp32=true", "train.micro_batch_size=4")
    assert code == 0, out
    assert re.search(r"^optimizer states \+ main params\s+static\s+0\.00", out, re.M)
    assert "host memory per rank (not on the GPU): 68.7 GiB" in out  # 4.1B x 18 B


@pytest.mark.parametrize("args, named", [
    (["--world-size", "6"], "world size 6"),
    (["--world-size", "0"], "--world-size=0"),
    (["--gpu-memory", "-1"], "--gpu-memory"),
    (["train.micro_batch_sise=1"], "train.micro_batch_sise"),
    (["optim.cpu_offload_fraction=1.5"], "optim.cpu_offload_fraction"),
])
def test_plan_refuses_user_errors_with_exit_2_naming_them(qwen3_32b_dir, args, named):
    options = [a for a in args if a.startswith("--") or a[0].isdigit() or a.startswith("-1")]
    overrides = [a for a in args if a not in options]
    code, out, err = _gazal("plan", *options, "--recipe", "recipes/grpo_qwen3_32b.yaml",
                            f"model.hf_path={qwen3_32b_dir}", *overrides)
    assert code == 2, out + err
    assert err.startswith("gazal plan: error:") and named in err, err


def test_dry_run_prints_the_plan_as_comments(tiny_hf_dir, no_launcher, tmp_path):
    import yaml

    from gazal_nemo.testing.tiny import write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", [{"question": "q?", "options": {"A": "a", "B": "b"}, "answer": "A",
                                                  "reasoning": "r"}])
    outputs = [f"{key}={tmp_path / key}" for key in ("checkpoint.dir", "logging.dir", "export_dir")]
    code, out, err = _gazal("sft", "--recipe", TINY_RECIPE, f"model.hf_path={tiny_hf_dir}",
                            f"sft_data.sources.0.path={data}", *outputs, "--dry-run")
    assert code == 0, err
    assert "# memory plan: tiny_cpu_sft" in out and "# FITS:" in out
    assert yaml.safe_load(out)["name"] == "tiny_cpu_sft"  # still a loadable recipe


# ---- the memory keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("optim.cpu_offload_fraction=-0.1", "optim.cpu_offload_fraction"),
    ("optim.cpu_offload_fraction=1.01", "optim.cpu_offload_fraction"),
    ("precision.grad_reduce_in_fp32=maybe", "precision.grad_reduce_in_fp32"),
    ("parallel.overlap_grad_reduce=3", "parallel.overlap_grad_reduce"),
])
def test_memory_keys_refuse_out_of_range_values(override, key):
    from gazal_nemo.recipe import load_recipe

    with pytest.raises(ValueError, match=re.escape(key)):
        load_recipe(TINY_RECIPE, [override])


def test_overlap_param_gather_needs_the_distributed_optimizer():
    from gazal_nemo.recipe import load_recipe

    with pytest.raises(ValueError, match="parallel.overlap_param_gather"):
        load_recipe(TINY_RECIPE, ["parallel.overlap_param_gather=true", "parallel.distributed_optimizer=false"])
    assert load_recipe(TINY_RECIPE, ["parallel.overlap_param_gather=true"]).parallel.overlap_param_gather


def test_cpu_offload_is_refused_without_cuda_or_the_distributed_optimizer():
    from gazal_nemo.recipe_sections import OptimConfig
    from gazal_nemo.training.optim import check_cpu_offload

    check_cpu_offload(OptimConfig(cpu_offload_fraction=0.0), distributed=False)  # off: nothing to check
    with pytest.raises(ValueError, match="parallel.distributed_optimizer=true"):
        check_cpu_offload(OptimConfig(cpu_offload_fraction=0.5), distributed=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            check_cpu_offload(OptimConfig(cpu_offload_fraction=0.5), distributed=True)


# ---- the activation model ----------------------------------------------------------------------


def test_fit_coefficients_recovers_the_coefficients_that_made_the_measurements(qwen3_32b_dir, tmp_path):
    """Measurements made with other coefficients (as a GPU would give) are fitted back. The
    terms must vary independently: two shapes (layer count, ffn) and several tp / lengths."""
    from gazal_nemo.training.memory_plan import ActivationCoefficients, fit_coefficients

    smaller = dict(QWEN3_32B_CONFIG, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                   num_attention_heads=32)
    (tmp_path / "config.json").write_text(json.dumps(smaller))
    truth = ActivationCoefficients(layer_replicated=11.0, layer_ffn=12.5, head_replicated=6.0, logits_sft=9.0)
    names = ["layer_replicated", "layer_ffn", "head_replicated", "logits_sft"]
    rows = []
    for model_dir in (qwen3_32b_dir, tmp_path):
        for mb, seq, tp in [(1, 2048, 2), (2, 4096, 4), (1, 8192, 8)]:
            plan = _plan("recipes/sft_qwen3_32b_dora.yaml", [
                f"model.hf_path={model_dir}", "adapter=null", "train.recompute=none", f"train.micro_batch_size={mb}",
                f"train.seq_length={seq}", f"sft_data.max_length={seq}", f"parallel.tp={tp}"], model_dir,
                world_size=tp, use_te=False, coefficients=truth)
            rows.append((plan.train_terms, plan.phase_bytes("train")))
    fitted = fit_coefficients(rows, names)
    for name in names:
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert fitted.layer_query == ActivationCoefficients().layer_query  # held fixed


def test_sequence_parallel_divides_the_replicated_activations_by_tp(qwen3_32b_dir):
    common = [f"model.hf_path={qwen3_32b_dir}", "parallel.sequence_parallel=true"]
    off = _plan("recipes/grpo_qwen3_32b.yaml", common, qwen3_32b_dir, world_size=8, use_te=False)
    on = _plan("recipes/grpo_qwen3_32b.yaml", common, qwen3_32b_dir, world_size=8, use_te=True)
    # Full recompute: the stored layer inputs are the replicated part, s*b*h*2 B per layer.
    stored = 64 * 7168 * 5120 * 2
    assert off.train_terms["checkpoint_input"] * 2 == pytest.approx(stored)
    assert on.train_terms["checkpoint_input"] * 2 == pytest.approx(stored / 8)
    assert _item(on, "activations") < _item(off, "activations") / 3
