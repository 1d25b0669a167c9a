"""Which trainable parameters get weight decay: DoRA magnitudes follow the paper's HF Trainer
(decayed) unless optim.decay_dora_magnitude=false restores megatron's no-decay-on-1-D rule."""

from pathlib import Path

import pytest

TINY_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu_sft.yaml"


def _decay_by_kind(hf_dir, *overrides) -> dict[str, set[float]]:
    from gazal_nemo.parallel import init_parallel
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.training.model_setup import build_train_model, unwrap
    from gazal_nemo.training.optim import build_optimizer

    init_parallel(tp=1)
    recipe = load_recipe(TINY_RECIPE, [f"model.hf_path={hf_dir}", "parallel.distributed_optimizer=false",
                                       "optim.weight_decay=0.1", *overrides])
    tm = build_train_model(recipe.model, recipe.parallel, recipe.precision, recipe.train, adapter_cfg=recipe.adapter)
    optimizer = build_optimizer(tm.chunks, recipe.optim, recipe.precision, distributed=False)
    names = {id(p): n for n, p in unwrap(tm.chunks[0]).named_parameters() if p.requires_grad}
    decay: dict[str, set[float]] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            kind = "magnitude" if ".magnitude." in name else "lora_A" if "lora_A" in name else "other"
            decay.setdefault(kind, set()).add(group["wd_mult"] * group["weight_decay"] if "wd_mult" in group
                                              else group["weight_decay"])
    return decay


@pytest.mark.parametrize("decay_magnitude, expected", [(True, {0.1}), (False, {0.0})])
def test_dora_magnitude_weight_decay_switch(tiny_hf_dir, decay_magnitude, expected):
    decay = _decay_by_kind(tiny_hf_dir, f"optim.decay_dora_magnitude={str(decay_magnitude).lower()}")
    assert decay["magnitude"] == expected
    assert decay["lora_A"] == {0.1}  # matrices are decayed either way
