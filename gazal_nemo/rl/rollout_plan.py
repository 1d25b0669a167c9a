"""Which prompts each GRPO rollout batch holds: a pure function of (batch index, data-parallel rank).

The epoch orders are permutations seeded by train.seed; batch `index` of epoch e takes
prompts_per_batch consecutive prompts of order e, and data-parallel rank d takes its
per_rank slice of them. Because nothing here depends on what was generated before, the
colocated trainer, the generator ranks of an asynchronous job, a resumed run and a run that
skipped data after a guard rollback all agree on the prompts of a batch without sharing
state (NeMo-RL PR 3599 lost ~30% of the prompts on resume because its data cursor counted
what was produced, not what was trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutPlan:
    """The data side of a GRPO run."""

    prompts: list
    """Every usable prompt (tasks.mcq.MCQPrompt), in file order."""
    orders: list[list[int]]
    """One permutation of the prompts per epoch."""
    prompts_per_batch: int
    """Prompts one rollout batch holds over all data-parallel ranks."""
    per_rank: int
    """Prompts of a batch on one data-parallel rank."""
    steps_per_batch: int
    """Optimizer steps one rollout batch feeds (grpo.num_iterations x grpo.steps_per_generation)."""

    @classmethod
    def build(cls, prompts: list, grpo, train, *, dp_size: int) -> RolloutPlan:
        prompts_per_batch = grpo.prompts_per_step * grpo.steps_per_generation
        if len(prompts) < prompts_per_batch:
            raise ValueError(f"{len(prompts)} prompts, fewer than grpo.prompts_per_step x grpo.steps_per_generation "
                             f"= {prompts_per_batch}")
        generator = torch.Generator().manual_seed(train.seed)
        orders = [torch.randperm(len(prompts), generator=generator).tolist() for _ in range(train.epochs)]
        return cls(prompts=prompts, orders=orders, prompts_per_batch=prompts_per_batch,
                   per_rank=prompts_per_batch // dp_size, steps_per_batch=grpo.num_iterations * grpo.steps_per_generation)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.prompts_per_batch

    def total_steps(self, train) -> int:
        """Optimizer steps of the run: every full batch of every epoch, capped by train.max_steps."""
        steps = self.batches_per_epoch * self.steps_per_batch * train.epochs
        return steps if train.max_steps is None else min(steps, train.max_steps)

    def share(self, index: int, dp_rank: int) -> list:
        """Data-parallel rank dp_rank's prompts of rollout batch `index`."""
        epoch, within = divmod(index, self.batches_per_epoch)
        epoch %= len(self.orders)  # data skipped by rollbacks can run past the last epoch: wrap
        start = within * self.prompts_per_batch + dp_rank * self.per_rank
        return [self.prompts[i] for i in self.orders[epoch][start:start + self.per_rank]]


def trainer_dp_size(recipe, num_trainers: int) -> int:
    """Data-parallel replicas of the trainer (an asynchronous job's generator ranks not counted)."""
    return num_trainers // (recipe.parallel.tp * recipe.parallel.pp * recipe.parallel.cp)


PROBE_COMPLETION = "<think>\nRecall the key finding, then weigh each option.\n</think>\nThe best answer is \\boxed{A}."


def push_probe(prompt_ids: list[int], tokenizer, stop_ids: list[int], *, multiple_of: int,
               max_tokens: int = 128) -> list[int]:
    """The weight-push gate's probe: a training prompt with a fixed completion in the task's format,
    at most max_tokens (the prompt's start is cut), a multiple of the TP size (sequence parallel)."""
    completion = tokenizer.encode(PROBE_COMPLETION, add_special_tokens=False) + list(stop_ids[:1])
    tokens = (list(prompt_ids) + completion)[-max_tokens:]
    return tokens[:len(tokens) - len(tokens) % multiple_of]
