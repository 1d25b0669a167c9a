"""The weight-push gate: after every push, the engine must score a fixed probe as the trainer does.

No public trainer checks this, and both peers shipped silent stale-weight bugs that looked
like training problems for weeks: NeMo-RL PR 4086 (with overlap_param_gather, refit sent
stale copies of other DP ranks' shards), verl issue 7495 (the adapter never reached the
generator). The check is end to end: a fixed probe (a prompt and completion of the run's
own task) is scored by the engine (vLLM's prompt log-probs: temperature 1, no filters) and
by the trainer (a forward of the training model, adapters unmerged), and every token's
log-prob must agree within a tolerance. Past it, the run stops on every rank with one
line naming the parameter group the engine holds stale (from the fingerprints of what it
received against a fresh read of the trainer's weights), or saying that it received
the current weights and still scores differently.

Tolerance. Both sides compute the same function in the same dtype with different kernels
(fused QKV, attention, reduction orders), so they differ by rounding only. A log-prob is
z_t - logsumexp(z): rounding the logits z by about u|z| (u the dtype's unit roundoff)
moves it by O(u * max|z|). Measured on random Qwen3s on CPU (docs/GRPO.md), the mean
|vLLM - trainer| over a probe is 0.7-1.0 u max|z| in bf16 and the largest 2-5.5 u max|z|.
The gate allows a mean of 4 u max|z| (floored at 1e-5 for fp32 noise) and a largest of four
times that: in fp32 any real difference trips it; in bf16 it catches what matters (an
adapter that never arrived, a layer or shard left stale, weights from many steps ago),
while a push skipped after one step of the paper's lr 1e-6 can hide inside the rounding.
`grpo.rollout.vllm.gate_tolerance` sets the mean bound directly (every push logs its gaps).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from gazal_nemo.parallel import collective_device

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


class WeightPushError(RuntimeError):
    """The engine's weights do not match the trainer's after a push (one line, names the group)."""


def derived_tolerance(dtype: torch.dtype, *, logit_scale: float) -> float:
    """Mean |engine - trainer| probe log-prob that rounding alone explains (module docstring)."""
    unit = UNIT_ROUNDOFF.get(dtype, 2.0**-8)
    return max(4 * unit * logit_scale, 1e-5)


@torch.no_grad()
def trainer_logprobs(model, tokens: list[int]) -> tuple[torch.Tensor, float]:
    """([len-1] float64 log-probs of tokens[1:] under the training model, temperature 1;
    the largest |logit|). Every TP rank calls it; dropout is off for the probe."""
    from megatron.core import parallel_state as ps

    from gazal_nemo.inference.sampling import vocab_parallel_token_logprobs

    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)
    positions = torch.arange(len(tokens), device=device)[None]
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, positions, None)
    finally:
        model.train(was_training)
    logprobs = vocab_parallel_token_logprobs(logits[:, :-1].float(), ids[:, 1:], 1.0, 0, 1.0)
    scale = logits.detach().abs().max().float()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    return logprobs[0].double().cpu(), float(scale)


class PushGate:
    """The probe and its tolerance for one run; `check(engine, version)` after every push.

    A generator rank of an asynchronous job has no trainer model (model=None): it judges
    against the log-probs the trainer sent with the weights (`judge`)."""

    def __init__(self, model, probe: list[int], *, dtype: torch.dtype, tolerance: float | None = None):
        if len(probe) < 2:
            raise ValueError("the push gate's probe needs at least 2 tokens")
        self.model, self.probe = model, list(probe)
        self.dtype, self.fixed_tolerance = dtype, tolerance
        self.last: dict[str, float] = {}

    def expected(self) -> tuple[torch.Tensor, float]:
        """The trainer's probe log-probs and largest |logit| (every TP rank of the trainer calls)."""
        return trainer_logprobs(self.model, self.probe)

    def check(self, engine, version: int) -> float:
        """Largest |engine - trainer| probe log-prob; raises WeightPushError on every rank when the
        mean gap passes the tolerance or the largest passes four times it."""
        expected, scale = self.expected()
        return self.judge(engine, expected, scale, version, lambda: engine.describe_mismatch(version))

    def judge(self, engine, expected: torch.Tensor, scale: float, version: int, describe) -> float:
        """check() against given trainer log-probs; describe() names the cause when it fails."""
        gap = (engine.prompt_logprobs(self.probe) - expected).abs()
        tolerance = self.fixed_tolerance or derived_tolerance(self.dtype, logit_scale=scale)
        worst, mean = float(gap.max()), float(gap.mean())
        self.last = {"max": worst, "mean": mean, "tolerance": tolerance}
        failed = not (mean <= tolerance and worst <= 4 * tolerance)  # NaN fails too
        if _any_rank(failed):
            message = (f"weight-push gate (policy version {version}): the rollout engine's probe log-probs differ "
                       f"from the trainer's by {mean:.3g} on average and {worst:.3g} at token {int(gap.argmax()) + 1} "
                       f"(allowed {tolerance:.3g} and {4 * tolerance:.3g}); {describe()}") if failed else ""
            raise WeightPushError(_first_message(message))
        return worst


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _first_message(message: str) -> str:
    """The first failing rank's message, on every rank."""
    if not dist.is_initialized():
        return message
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    rank, text = next((r, m) for r, m in enumerate(messages) if m)
    return text if text == message else f"rank {rank}: {text}"
