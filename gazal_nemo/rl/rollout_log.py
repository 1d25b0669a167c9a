"""Rollouts a person can read: every `grpo.log_rollouts_every` steps, some sampled groups as JSON lines.

What one opens when a curve looks wrong (TRL and verl give their users the same): each
completion of the first `grpo.log_rollouts_groups` groups of data-parallel rank 0, with its
prompt row, group, text, token count, how it ended, every reward component and its
advantage, in `logging.dir/rollouts.jsonl`. A resumed run drops the rows after its
checkpoint first, so each step appears once; after a guard rollback the re-run steps are
appended again (the later rows are the ones that trained).
"""

from __future__ import annotations

import json
from pathlib import Path

ROLLOUTS_FILE = "rollouts.jsonl"
TRAINED_PROMPTS_FILE = "trained_prompts.jsonl"


class RolloutLog:
    """Appends logged steps' completions to rollouts.jsonl (one writer: global rank 0)."""

    def __init__(self, log_dir: str | Path, *, every: int, groups: int, enabled: bool, resume_step: int = 0):
        self.path = Path(log_dir) / ROLLOUTS_FILE
        self.every, self.groups = every, groups
        self.enabled = enabled and every > 0 and groups > 0
        self._handle = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_rows_after(self.path, resume_step)

    def maybe_write(self, step: int, scored) -> None:
        """Log rollout batch `scored` (rl.rollout_batch.ScoredGroups) when `step` is due."""
        if not self.enabled or step % self.every:
            return
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        if len(scored.texts) != len(scored.completions):
            raise ValueError(f"rollout log: {len(scored.texts)} texts for {len(scored.completions)} completions")
        per_group = len(scored.completions) // max(scored.num_groups, 1)
        names = sorted(scored.scores.per_reward)
        for index, completion in enumerate(scored.completions[:self.groups * per_group]):
            prompt = scored.prompts[completion.prompt_index]
            record = {
                "step": step, "policy_version": completion.policy_version, "prompt_row": getattr(prompt, "row", None),
                "group": completion.prompt_index, "sample": index % per_group,
                "gold": getattr(prompt, "gold_letter", None), "text": scored.texts[index],
                "num_tokens": len(completion.tokens), "truncated": completion.truncated,
                "finish_reason": completion.finish_reason,
                "rewards": {name: float(scored.scores.per_reward[name][index]) for name in names},
                "reward_total": float(scored.scores.total[index]),
                "advantage": float(scored.advantages.advantages[index]),
            }
            self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class TrainedPromptsLog:
    """logging.dir/trained_prompts.jsonl: the data rows each step trained, over every data-parallel
    rank: {"step": s, "rows": [...]}. With the resume rule of RolloutLog it is the audit trail of
    "every prompt of an epoch trained once" (asynchronous rollouts, resumes, rollbacks)."""

    def __init__(self, log_dir: str | Path, *, enabled: bool, resume_step: int = 0):
        self.path = Path(log_dir) / TRAINED_PROMPTS_FILE
        self.enabled = enabled
        self._handle = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_rows_after(self.path, resume_step)

    def write(self, step: int, rows: list, *, group) -> None:
        """Every data-parallel rank calls with its rows; the writer appends them all."""
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, rows, group=group)
        if not self.enabled:
            return
        if self._handle is None:
            self._handle = open(self.path, "a", encoding="utf-8")
        self._handle.write(json.dumps({"step": step, "rows": [r for part in gathered for r in part]}) + "\n")
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of steps <= step (a torn last line goes too); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
