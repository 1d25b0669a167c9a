"""The optimizer-step loop shared by SFT and GRPO: step, log, checkpoint, resume.

The loop knows nothing about the objective: a stage hands it a function that produces
the micro-batches of step `s` (deterministic in `s`, so resuming at step s continues the
same data order) and a megatron forward-step function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.distributed as dist

from gazal_nemo.recipe_sections import CheckpointConfig
from gazal_nemo.training import checkpoint as ckpt
from gazal_nemo.training.metrics import MetricsLogger
from gazal_nemo.training.model_setup import finish_param_gather
from gazal_nemo.training.preemption import agreed_stop_signal
from gazal_nemo.training.step import configure_schedule_hooks, metric_means, run_step


@dataclass
class LoopResult:
    last_step: int
    history: list[dict]
    checkpoint: str | None
    stopped_by: str | None = None
    """Name of the signal (SIGUSR1/SIGTERM) that ended the run early with a checkpoint; None otherwise."""


def maybe_resume(ckpt_cfg: CheckpointConfig, *, chunks, optimizer, scheduler,
                 recipe_dict: dict | None = None) -> tuple[int, dict]:
    """Load the newest complete checkpoint when resuming is on; returns (start step, state).

    A damaged newest checkpoint falls back to an older complete one; a recipe that differs
    from the checkpoint's in a key that alters the run is refused (training/resume_check.py).
    """
    if not ckpt_cfg.resume:
        return 0, {}
    latest = ckpt.choose_resume_checkpoint(ckpt_cfg.dir)
    if latest is None:
        return 0, {}
    if recipe_dict is not None:
        from gazal_nemo.training.resume_check import check_resume_recipe

        check_resume_recipe(ckpt.read_saved_recipe(latest), recipe_dict, where=latest)
    state = ckpt.load_checkpoint(latest, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler)
    if dist.get_rank() == 0:
        print(f"resumed from {latest} (step {state['step']})", flush=True)
    return int(state["step"]), state


def train_loop(*, chunks, config, optimizer, scheduler, total_steps: int, microbatches_for_step: Callable,
               forward_step: Callable, seq_length: int, micro_batch_size: int, ckpt_cfg: CheckpointConfig,
               logger: MetricsLogger, recipe_dict: dict, start_step: int = 0, log_every: int = 1,
               tokens_for_step: Callable | None = None, flops_per_token: float | None = None,
               peak_tflops: float | None = None, after_step: Callable | None = None,
               extra_metrics: Callable | None = None, stop_after: int | None = None, guard=None,
               evaluate: Callable[[int], dict] | None = None) -> LoopResult:
    """Run steps start_step+1 .. total_steps (or stop_after steps, for tests of resume).

    A SIGUSR1/SIGTERM (training/preemption.py) ends the loop at the next step boundary,
    after a checkpoint of the last finished step; `LoopResult.stopped_by` says so.
    `guard` (rl/guard.py RollbackGuard, GRPO) judges each step; when it fires, the loop
    restores the last healthy checkpoint and goes on from there (see `_roll_back`).
    `evaluate(step)` (eval/in_training.py) adds held-out metrics to a step's row when due.
    """
    configure_schedule_hooks(config, chunks, optimizer)
    history, last_saved, saved_step, stopped_by = [], None, None, None
    step = start_step
    end = total_steps if stop_after is None else min(total_steps, start_step + stop_after)

    def save(step: int):
        finish_param_gather(chunks)  # with parallel.overlap_param_gather the step's params may be mid-gather
        state = {"total_steps": total_steps, **(guard.state() if guard is not None else {})}
        path = ckpt.save_checkpoint(
            ckpt_cfg.dir, step, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler,
            trainer_state=state, recipe_dict=recipe_dict, keep_last=ckpt_cfg.keep_last)
        if guard is not None:
            guard.after_save(step, path)
        return path

    while step < end:
        stopped_by = agreed_stop_signal()
        if stopped_by is not None:
            break
        t0 = time.time()
        microbatches = microbatches_for_step(step)  # for GRPO this includes the rollouts
        t1 = time.time()
        metrics = run_step(chunks=chunks, optimizer=optimizer, scheduler=scheduler, forward_step=forward_step,
                           microbatches=microbatches, seq_length=seq_length, micro_batch_size=micro_batch_size,
                           after_step=after_step)
        step += 1
        train_time = time.time() - t1
        row = metric_means(metrics)
        row["lr"] = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else 0.0
        row["step_time_s"] = time.time() - t0
        row["data_time_s"] = t1 - t0
        if tokens_for_step is not None:
            tokens = tokens_for_step(microbatches)
            row["train_tokens_per_s"] = tokens / max(train_time, 1e-9)
            if flops_per_token and peak_tflops:
                row["mfu"] = tokens * flops_per_token / train_time / (peak_tflops * 1e12 * dist.get_world_size())
        if extra_metrics is not None:
            row.update(extra_metrics())
        if evaluate is not None:
            row.update(evaluate(step))
        history.append(dict(row, step=step))
        if step % log_every == 0 or step == end:
            logger.log(step, row)
        if guard is not None and guard.observe(step, row):
            step = _roll_back(guard, step, chunks=chunks, optimizer=optimizer, scheduler=scheduler, logger=logger,
                              after_step=after_step)
            history = [h for h in history if h["step"] <= step]
            continue
        if ckpt_cfg.save_every and step % ckpt_cfg.save_every == 0 or step in (total_steps, end):
            last_saved, saved_step = save(step), step
    if stopped_by is not None and step > start_step and saved_step != step:
        last_saved = save(step)
    if stopped_by is not None and dist.get_rank() == 0:
        where = last_saved if last_saved else "nothing new to save"
        print(f"gazal: stopping after step {step}/{total_steps} on {stopped_by}: checkpoint {where}", flush=True)
    return LoopResult(last_step=step, history=history, checkpoint=str(last_saved) if last_saved else None,
                      stopped_by=stopped_by)


def _roll_back(guard, step: int, *, chunks, optimizer, scheduler, logger, after_step) -> int:
    """Restore the guard's last healthy checkpoint exactly as a resume would (weights,
    optimizer, scheduler, RNG); the guard then skips the data of the steps in between.
    Returns the step training continues after."""
    from gazal_nemo.rl.guard import TrainingCollapsed

    target = guard.last_good
    if target is None:
        raise TrainingCollapsed(f"the run collapsed at step {step} ({'; '.join(guard.last_verdict.reasons)}) before "
                                "any healthy checkpoint was pinned; lower checkpoint.save_every")
    state = ckpt.load_checkpoint(target, model_chunks=chunks, optimizer=optimizer, scheduler=scheduler)
    to_step = int(state["step"])
    guard.rolled_back(step, to_step, scheduler)
    logger.event(step, "guard/rollback_to_step", float(to_step))
    logger.rewind(to_step)
    if after_step is not None:
        after_step()  # adapter norms cached for the weights before the rollback
    return to_step
