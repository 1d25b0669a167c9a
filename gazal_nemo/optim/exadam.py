"""EXAdam: Adam with cross-moment bias correction and a gradient acceleration term.

Gazal-R1 trains both stages with EXAdam (paper Appendix A; A. M. Adly, "EXAdam: The Power
of Adaptive Cross-Moments", arXiv 2412.20302). Per parameter, with gradient g at step t:

    theta <- theta - lr * wd * theta                     decoupled weight decay   [code]
    m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2    Adam's moments           [paper]
    d1 = 1 + v / (v + eps) * b2^t                        cross-moment corrections [paper]
    d2 = 1 + m^2 / (m^2 + eps) * b1^t
    m~ = m / (1 - b1^t) * d1 ;  v~ = v / (1 - b2^t) * d2
    g~ = g / (1 - b1^t) * d1                             gradient acceleration    [paper]
    a_t = lr * ln(sqrt(2) * sqrt(t + 1))   if step_size_schedule else lr          [paper v1]
    theta <- theta - a_t * (m~ + g~) / (sqrt(v~) + eps)

Where each part comes from:
- [paper] Algorithm 1 of arXiv 2412.20302 (v1 and v2 agree on the moments, d1/d2 and g~).
- [paper v1] v1 also grew the step size as lr * ln(sqrt(2 (t + 1))) ("dynamic step size").
  v2 of the paper and the authors' reference code (github.com/AhmedMostafa16/EXAdam,
  exadam.py) later dropped it. We keep it behind `step_size_schedule`, default **False**:
  the recipe already schedules the learning rate (cosine for SFT, constant for GRPO), and
  a hidden ~4x growth over the first thousand steps would make `lr` mean something else
  than the paper's Table 3/4 values say.
- [code] Weight decay is not in Algorithm 1; the reference code applies it AdamW-style
  (theta *= 1 - lr * wd, before the update, with the plain lr even when the step-size
  schedule is on). We do the same.

Why it fits megatron-core's DistributedOptimizer: the rule is elementwise with per-tensor
state, so running it on each rank's flat fp32 shard of the main params is the same as
running it on the full tensors. State keys match torch's Adam (`step`, `exp_avg`,
`exp_avg_sq`), which is what megatron's checkpointing saves and re-allocates. megatron
keeps the step count in two ways depending on whether Transformer Engine is installed:
per-parameter `state["step"]` tensors (torch fallback) or `param_group["step"]` (TE), so
we write both and, on load, fill a missing per-parameter step from the group.
"""

from __future__ import annotations

import math

import torch


class ExAdam(torch.optim.Optimizer):
    """EXAdam with decoupled weight decay; see the module docstring for the rule and sources.

    Args:
        params: parameters or param groups (groups may carry extra keys, e.g. megatron's).
        lr: learning rate (the paper's SFT value is 2e-5, GRPO 1e-6).
        betas: decay rates of the first and second moments.
        eps: added to v in the cross-moment terms and to the denominator.
        weight_decay: decoupled (AdamW-style) weight decay coefficient (paper: 0.1).
        step_size_schedule: scale lr by ln(sqrt(2) * sqrt(t + 1)) as in the paper's v1.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        step_size_schedule: bool = False,
    ):
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            step_size_schedule=bool(step_size_schedule),
        )
        super().__init__(params, defaults)

    @classmethod
    def from_param_groups(cls, param_groups: list[dict], **hyperparameters) -> ExAdam:
        """ExAdam over existing param groups (e.g. megatron's), whose params may be non-leaf views.

        megatron's distributed optimizer hands the inner optimizer flat fp32 shards that,
        for fp32 models, are views of the model parameters; torch's `add_param_group`
        refuses non-leaf tensors. megatron itself installs its groups by assignment, and
        so do we: the group dicts are kept (their lr / weight_decay, set per group by
        megatron, win over `hyperparameters`), only missing keys are filled in.
        """
        optimizer = cls([torch.nn.Parameter(torch.zeros(0))], **hyperparameters)
        for group in param_groups:
            group["params"] = list(group["params"])
            for key, value in optimizer.defaults.items():
                group.setdefault(key, value)
        optimizer.param_groups = list(param_groups)
        optimizer.state.clear()
        return optimizer

    def __setstate__(self, state):
        """Normalise loaded state: one fresh CPU `step` tensor per parameter.

        Fresh tensors matter: torch's load_state_dict keeps `step` tensors by reference,
        and megatron's loader assigns one shared tensor to every parameter.
        """
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("step_size_schedule", False)
            for param in group["params"]:
                param_state = self.state.get(param)
                step = _previous_step(param_state or {}, group)
                if param_state and step > 0:
                    param_state["step"] = torch.tensor(float(step))

    @torch.no_grad()
    def step(self, closure=None):
        """One EXAdam update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            steps_taken = []
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("ExAdam does not support sparse gradients")
                step = _advance_step(self.state[param], param, group)
                _exadam_update(param, param.grad, self.state[param], step=step, group=group)
                steps_taken.append(step)
            if steps_taken:
                group["step"] = max(steps_taken)
        return loss


def _previous_step(param_state: dict, group: dict) -> int:
    """Steps already taken: the parameter's own count, else its group's, else 0 (fresh).

    megatron's Adam `init_state_fn` and its TE-path checkpoints leave the moments without
    a per-parameter step; the group's step is then the count.
    """
    if "step" in param_state:
        return int(float(param_state["step"]))
    return int(group.get("step") or 0)


def _advance_step(param_state: dict, param, group: dict) -> int:
    """Create missing moments and return the new (1-based) step count."""
    if "exp_avg" not in param_state:
        param_state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        param_state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    step = _previous_step(param_state, group) + 1
    param_state["step"] = torch.tensor(float(step))  # replaced, never mutated (see __setstate__)
    return step


def step_size_factor(step: int, schedule: bool) -> float:
    """Multiplier of lr at 1-based `step`: ln(sqrt(2) * sqrt(t + 1)) with the v1 schedule, else 1."""
    return math.log(math.sqrt(2.0) * math.sqrt(step + 1)) if schedule else 1.0


def _exadam_update(param, grad, param_state, *, step: int, group) -> None:
    """In-place EXAdam update of one tensor (its moments and the parameter)."""
    lr = float(group["lr"])
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    if group["weight_decay"] != 0.0:
        param.mul_(1.0 - lr * group["weight_decay"])
    exp_avg, exp_avg_sq = param_state["exp_avg"], param_state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    beta1_t, beta2_t = beta1**step, beta2**step
    # m~ + g~ = (m + g) * d1 / (1 - b1^t)
    d1 = exp_avg_sq / (exp_avg_sq + eps) * beta2_t + 1.0
    numerator = (exp_avg + grad).mul_(d1).div_(1.0 - beta1_t)
    del d1
    exp_avg_2 = exp_avg * exp_avg
    d2 = exp_avg_2.div_(exp_avg_2 + eps).mul_(beta1_t).add_(1.0)
    denominator = d2.mul_(exp_avg_sq).div_(1.0 - beta2_t).sqrt_().add_(eps)
    step_size = lr * step_size_factor(step, group["step_size_schedule"])
    param.addcdiv_(numerator, denominator, value=-step_size)


def _check_hyperparameters(*, lr, betas, eps, weight_decay) -> None:
    if not lr >= 0.0:
        raise ValueError(f"ExAdam lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"ExAdam betas must be two values in [0, 1), got {betas}")
    if not eps >= 0.0:
        raise ValueError(f"ExAdam eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"ExAdam weight_decay must be >= 0, got {weight_decay}")
