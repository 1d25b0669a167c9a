"""One optimizer step through megatron's forward/backward schedules.

The schedule runs the micro-batches (pipelined when pp > 1); losses are returned as
(sum, token count) so megatron normalises gradients by the number of loss tokens in the
whole global batch (`calculate_per_token_loss`), not per micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def configure_schedule_hooks(config, chunks, optimizer) -> None:
    """Wire megatron's grad finalisation, loss scaling and DDP no-sync into the config."""
    from megatron.core.distributed import finalize_model_grads

    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync


def run_step(*, chunks, optimizer, scheduler, forward_step, microbatches: list, seq_length: int,
             micro_batch_size: int, after_step=None) -> dict:
    """Forward/backward over `microbatches`, then one optimizer + scheduler step.

    Returns summed metrics (each metric a [sum, count] pair from the loss function,
    reduced over data-parallel ranks) plus grad norm and whether the step was taken.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reduced = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(microbatches), model=chunks,
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
        if after_step is not None:
            after_step()
    metrics = _sum_metrics(reduced)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        _all_reduce_metrics(metrics, ps.get_data_parallel_group(with_context_parallel=True))
    metrics = _broadcast_from_last_stage(metrics)
    return {"grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "skipped": not update_successful, **metrics}


def _sum_metrics(reduced: list[dict]) -> dict:
    totals: dict[str, torch.Tensor] = {}
    for item in reduced or []:
        for k, v in item.items():
            v = v.detach().float().reshape(-1)
            totals[k] = totals[k] + v if k in totals else v.clone()
    return totals


def _all_reduce_metrics(metrics: dict, group) -> None:
    for v in metrics.values():
        dist.all_reduce(v, group=group)


def _broadcast_from_last_stage(metrics: dict) -> dict:
    """Every rank gets the last stage's metrics (so rank 0 can log them)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return metrics
    holder = [metrics if ps.is_pipeline_last_stage(ignore_virtual=True) else None]
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast_object_list(holder, src=last, group=ps.get_pipeline_model_parallel_group())
    return holder[0]


def metric_means(metrics: dict) -> dict:
    """[sum, count] pairs -> means; scalars pass through."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 2:
            out[k] = (v[0] / v[1].clamp(min=1)).item()
        elif isinstance(v, torch.Tensor):
            out[k] = v.sum().item()
        else:
            out[k] = v
    return out
