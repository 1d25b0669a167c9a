"""ExAdam against a hand computation of the EXAdam rule (arXiv 2412.20302) in NumPy."""

import io
import math

import numpy as np
import pytest
import torch

from gazal_nemo.optim.exadam import ExAdam

LR, BETAS, EPS = 0.01, (0.9, 0.999), 1e-8


def _reference_steps(theta, grads, *, lr, betas, eps, weight_decay, schedule):
    """EXAdam written out elementwise from the paper (decay as in the authors' code)."""
    beta1, beta2 = betas
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        theta = theta - lr * weight_decay * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        d1 = 1 + v / (v + eps) * beta2**t
        d2 = 1 + m * m / (m * m + eps) * beta1**t
        m_tilde = m / (1 - beta1**t) * d1
        v_tilde = v / (1 - beta2**t) * d2
        g_tilde = g / (1 - beta1**t) * d1
        alpha = lr * math.log(math.sqrt(2) * math.sqrt(t + 1)) if schedule else lr
        theta = theta - alpha * (m_tilde + g_tilde) / (np.sqrt(v_tilde) + eps)
    return theta


def _gradient_sequence(num_steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    # Mixed scales, including tiny gradients where eps inside d1/d2 matters.
    scales = np.array([1.0, 1e-3, 1e-5, 0.3])[: shape[-1]]
    return [rng.normal(size=shape) * scales for _ in range(num_steps)]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("schedule", [False, True])
def test_matches_hand_computation(weight_decay, schedule):
    theta0 = np.array([[0.5, -1.0, 2.0, 0.01], [-0.3, 0.7, -2.5, 1.5]])
    grads = _gradient_sequence(6, theta0.shape)
    param = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = ExAdam([param], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, step_size_schedule=schedule)
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step()
    expected = _reference_steps(
        theta0, grads, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, schedule=schedule
    )
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-12, atol=1e-14)
    assert not np.allclose(expected, theta0)


def test_schedule_and_decay_change_the_result():
    """The switches are live: each one alone moves the parameters differently."""
    theta0 = np.array([[0.5, -1.0, 2.0, 0.01]])
    grads = _gradient_sequence(3, theta0.shape)
    common = dict(lr=LR, betas=BETAS, eps=EPS)
    plain = _reference_steps(theta0, grads, weight_decay=0.0, schedule=False, **common)
    for kwargs in (dict(weight_decay=0.1, schedule=False), dict(weight_decay=0.0, schedule=True)):
        param = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
        opt = ExAdam(
            [param], weight_decay=kwargs["weight_decay"], step_size_schedule=kwargs["schedule"], **common
        )
        for g in grads:
            param.grad = torch.tensor(g)
            opt.step()
        assert np.abs(param.detach().numpy() - plain).max() > 1e-6


def test_first_step_closed_form():
    """At t=1 with eps=0: m~ = g d1, g~ = g d1 / (1-b1), v~ = g^2 d2, with d1 = 1+b2, d2 = 1+b1.

    So every element moves by sign(g) * (1+b2) (1 + 1/(1-b1)) / sqrt(1+b1) ~ 16 lr, a
    closed form that does not share the step-by-step reference's arithmetic.
    """
    g = np.array([0.5, -2.0, 3e-4])
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ExAdam([param], lr=1.0, eps=0.0)
    param.grad = torch.tensor(g)
    opt.step()
    beta1, beta2 = BETAS
    expected = -np.sign(g) * (1 + beta2) * (1 + 1 / (1 - beta1)) / math.sqrt(1 + beta1)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-12)


def _run(opt, params, grads):
    for g_list in grads:
        for p, g in zip(params, g_list):
            p.grad = g.clone()
        opt.step()


def _make(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    groups = [{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}]
    return params, groups


@pytest.mark.parametrize("schedule", [False, True])
def test_state_dict_round_trip_continues_identically(schedule):
    torch.manual_seed(1)
    grads = [[torch.randn(3, 4), torch.randn(5)] for _ in range(7)]

    params_a, groups_a = _make()
    opt_a = ExAdam(groups_a, lr=1e-2, step_size_schedule=schedule)
    _run(opt_a, params_a, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params_a], "optim": opt_a.state_dict()}, buffer)
    _run(opt_a, params_a, grads[4:])

    buffer.seek(0)
    saved = torch.load(buffer)
    params_b, groups_b = _make(seed=123)  # different init: everything must come from the checkpoint
    with torch.no_grad():
        for p, saved_p in zip(params_b, saved["params"]):
            p.copy_(saved_p)
    opt_b = ExAdam(groups_b, lr=1e-2, step_size_schedule=not schedule)  # the switch is restored too
    opt_b.load_state_dict(saved["optim"])
    assert sorted(opt_b.state[params_b[0]]) == ["exp_avg", "exp_avg_sq", "step"]
    assert float(opt_b.state[params_b[0]]["step"]) == 4
    _run(opt_b, params_b, grads[4:])
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_from_group_step_only():
    """megatron's TE-path checkpoints keep the step in param_groups, not per parameter."""
    torch.manual_seed(2)
    grads = [[torch.randn(3, 4), torch.randn(5)] for _ in range(5)]
    params_a, groups_a = _make()
    opt_a = ExAdam(groups_a, lr=1e-2)
    _run(opt_a, params_a, grads[:3])
    state = {k: v for k, v in opt_a.state_dict().items()}
    state = torch.load(io.BytesIO(_saved_bytes(state)))
    for param_state in state["state"].values():
        del param_state["step"]
    assert all(group["step"] == 3 for group in state["param_groups"])
    snapshot = [p.detach().clone() for p in params_a]
    _run(opt_a, params_a, grads[3:])

    params_b, groups_b = _make()
    with torch.no_grad():
        for p, s in zip(params_b, snapshot):
            p.copy_(s)
    opt_b = ExAdam(groups_b, lr=1e-2)
    opt_b.load_state_dict(state)
    _run(opt_b, params_b, grads[3:])
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _saved_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_extra_group_keys_and_no_grad_params():
    """megatron hands over its own param groups (extra keys); params without grad are skipped."""
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    group = {
        "params": [used, unused],
        "wd_mult": 1.0,
        "lr_mult": 1.0,
        "is_expert_parallel": False,
        "lr": 0.1,
        "weight_decay": 0.0,
        "betas": BETAS,
        "eps": EPS,
    }
    opt = ExAdam([group])
    used.grad = torch.ones(2)
    opt.step()
    assert torch.equal(unused, torch.ones(2)) and unused not in opt.state
    assert (used < 1).all()


def test_from_param_groups_takes_non_leaf_shards_and_keeps_group_values():
    """megatron's fp32 main-param shards are views of the model params (non-leaf tensors)."""
    weight = torch.nn.Parameter(torch.ones(6))
    shard = weight.view(-1)[2:5]
    group = {"params": [shard], "weight_decay": 0.0, "wd_mult": 0.0}
    with pytest.raises(ValueError, match="non-leaf"):
        ExAdam([dict(group)])
    opt = ExAdam.from_param_groups([group], lr=0.1, weight_decay=0.5)
    assert opt.param_groups[0] is group and group["weight_decay"] == 0.0 and group["lr"] == 0.1
    shard.grad = torch.ones(3)
    opt.step()
    assert weight.detach()[[0, 1, 5]].tolist() == [1.0, 1.0, 1.0]
    assert (weight.detach()[2:5] < 1.0).all()  # updated in place through the view
    assert len(opt.state) == 1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ExAdam([torch.nn.Parameter(torch.ones(1))], **kwargs)


# ---- inside megatron-core's DistributedOptimizer ------------------------------------------


def _sharded_vs_full(hf_dir, ids):
    """3 steps of ExAdam as the inner optimizer of megatron's DistributedOptimizer (fp32
    main-param shards over 2 data-parallel ranks) and of plain ExAdam on a full copy."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from gazal_nemo.convert.load_hf import load_hf_weights
    from gazal_nemo.models.qwen3 import Qwen3Shape, build_qwen3, transformer_config
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=1)
    shape = Qwen3Shape.from_pretrained(hf_dir)

    def build():
        config = transformer_config(shape, tp=1, pp=1)
        model = build_qwen3(shape, config)
        load_hf_weights(model, hf_dir, shape)
        return config, model

    config, model = build()
    _, full = build()
    ddp = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    megatron_opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, weight_decay=0.1, clip_grad=0.0, use_distributed_optimizer=True
        ),
        [ddp],
    )
    inners = getattr(megatron_opt, "chained_optimizers", [megatron_opt])
    for wrapper in inners:
        wrapper.optimizer = ExAdam.from_param_groups(
            wrapper.optimizer.param_groups, lr=1e-3, weight_decay=0.1
        )
    reference = ExAdam(full.parameters(), lr=1e-3, weight_decay=0.1)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    for _ in range(3):
        ddp.zero_grad_buffer()
        megatron_opt.zero_grad()
        ddp(ids, positions, None).logsumexp(-1).mean().backward()
        ddp.finish_grad_sync()
        megatron_opt.step()
        reference.zero_grad()
        full(ids, positions, None).logsumexp(-1).mean().backward()
        reference.step()
    shard_numel = sum(p.numel() for w in inners for g in w.optimizer.param_groups for p in g["params"])
    error = max((p - q).abs().max().item() for p, q in zip(model.parameters(), full.parameters()))
    moved = max((p - q).abs().max().item() for p, q in zip(full.parameters(), build()[1].parameters()))
    return error, moved, shard_numel, sum(p.numel() for p in full.parameters())


@pytest.mark.slow
def test_inner_optimizer_of_megatron_distributed_optimizer(tiny_hf_dir):
    from gazal_nemo.testing.multiproc import run_distributed

    torch.manual_seed(0)
    ids = torch.randint(0, 384, (2, 16))
    results = run_distributed(_sharded_vs_full, 2, str(tiny_hf_dir), ids)
    for error, moved, shard_numel, total_numel in results:
        assert shard_numel < 0.6 * total_numel  # each rank really holds only its shard
        assert moved > 1e-2  # the steps did something
        assert error < 1e-6, f"sharded ExAdam differs from full ExAdam by {error}"
