"""The link between the trainer ranks and the generator ranks of an asynchronous GRPO job.

One job, one launcher (torchrun or srun): the last `grpo.rollout.generator_ranks` ranks
generate, the others train. Each side has its own torch.distributed world (megatron's
parallel state must not see the generators; vLLM's external launcher must not see the
trainer), so the processes are regrouped before anything else starts:

  * the trainer world keeps MASTER_ADDR:MASTER_PORT (its rank 0 is the job's rank 0);
  * the job's rank 0 also serves one TCPStore on MASTER_PORT + 1, reachable from every node,
    and everything else goes through it: the generator world's rendezvous (prefix
    "generators"), the control plane (prefix "bridge": requests, batches, failures, stop),
    and the rendezvous of the weight group;
  * the weight group joins the trainer's rank 0 with every generator rank (gloo on CPU,
    NCCL on GPUs): the trainer's weights go out as one broadcast per bucket.

Objects on the control plane are pickled into store values: a rollout batch share is a few
MB at most (completions as token ids, rewards, texts), which the store moves easily.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

STORE_PORT_OFFSET = 1
"""The bridge store listens on MASTER_PORT + this (the trainer's rendezvous has MASTER_PORT)."""


@dataclass(frozen=True)
class Role:
    """This process's place in an asynchronous job."""

    name: str
    """'trainer' or 'generator'."""
    rank: int
    """Rank within its own world."""
    world_size: int
    """Size of its own world."""
    job_rank: int
    num_trainers: int
    num_generators: int

    @property
    def is_generator(self) -> bool:
        return self.name == "generator"


def split_roles(job_rank: int, job_world: int, num_generators: int) -> Role:
    """The last num_generators ranks generate; refuses a split that leaves no trainer."""
    if not 0 < num_generators < job_world:
        raise ValueError(f"grpo.rollout.generator_ranks={num_generators} with {job_world} ranks in the job; "
                         f"allowed: 1 .. {job_world - 1} (the rest train)")
    trainers = job_world - num_generators
    if job_rank < trainers:
        return Role("trainer", job_rank, trainers, job_rank, trainers, num_generators)
    return Role("generator", job_rank - trainers, num_generators, job_rank, trainers, num_generators)


def enter_role_world(role: Role) -> None:
    """Point the launcher variables at this role's own world (what init_parallel and vLLM's
    external launcher read). Generators rendezvous through the bridge store instead of
    MASTER_PORT, whose host is the trainer's rank 0."""
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(role.rank), str(role.world_size)
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


class Bridge:
    """Control plane (store) and weight group of one asynchronous job, seen from one process."""

    def __init__(self, role: Role, *, timeout_min: float = 30.0):
        self.role = role
        self.timeout = datetime.timedelta(minutes=timeout_min)
        address = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ.get("MASTER_PORT", "29500")) + STORE_PORT_OFFSET
        root = dist.TCPStore(address, port, world_size=None, is_master=role.job_rank == 0, timeout=self.timeout,
                             wait_for_workers=False)
        self._root = root
        self.store = dist.PrefixStore("bridge/", root)
        self.generator_store = dist.PrefixStore("generators/", root)
        self._weights = None

    # ---- control plane ----------------------------------------------------------------------

    def put(self, key: str, value) -> None:
        self.store.set(key, pickle.dumps(value))

    def get(self, key: str, *, poll_failure: bool = True):
        """The object at `key`, waiting for it (and raising if a generator reported a failure)."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not self.store.check([key]):
            if poll_failure:
                self.raise_if_failed()
            if time.monotonic() > deadline:
                raise TimeoutError(f"asynchronous rollouts: nothing at {key!r} after {self.timeout}; "
                                   "are the generator ranks alive? (their log says)")
            time.sleep(0.02)
        return pickle.loads(self.store.get(key))

    def has(self, key: str) -> bool:
        return self.store.check([key])

    def delete(self, key: str) -> None:
        self.store.delete_key(key)

    def counter(self, key: str, increment: int = 0) -> int:
        return int(self.store.add(key, increment))

    def report_failure(self, message: str) -> None:
        self.put("failed", message)

    def raise_if_failed(self) -> None:
        if self.store.check(["failed"]):
            from gazal_nemo.inference.push_gate import WeightPushError

            raise WeightPushError(f"generator: {pickle.loads(self.store.get('failed'))}")

    # ---- weights -------------------------------------------------------------------------------

    def _weight_group(self):
        """trainer rank 0 (member 0) + every generator (1 + generator rank); built on first use."""
        if self._weights is None:
            member = 0 if not self.role.is_generator else 1 + self.role.rank
            size = 1 + self.role.num_generators
            store = dist.PrefixStore("weights/", self._root)
            if torch.cuda.is_available():
                self._weights = dist.ProcessGroupNCCL(store, member, size, dist.ProcessGroupNCCL.Options())
            else:
                self._weights = dist.ProcessGroupGloo(store, member, size, self.timeout)
        return self._weights

    def broadcast_bucket(self, flat: torch.Tensor) -> None:
        """One broadcast of a flat bucket buffer from the trainer's rank 0 to every generator."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._weight_group().broadcast([flat], options).wait()


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[torch.Tensor, dict]]:
    """[(one contiguous buffer, its layout)] per dtype of a bucket (norm weights may be fp32 beside
    bf16 matrices): one broadcast per buffer instead of one per tensor. A layout is
    {"dtype": name, "tensors": [(name, shape, numel)]}."""
    groups: dict[torch.dtype, list] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return [(torch.cat([t.reshape(-1) for _, t in items]),
             {"dtype": str(dtype).removeprefix("torch."), "tensors": [(n, tuple(t.shape), t.numel()) for n, t in items]})
            for dtype, items in groups.items()]


def empty_buffer(layout: dict, device) -> torch.Tensor:
    """A receive buffer for one flat_bucket buffer."""
    return torch.empty(sum(numel for _, _, numel in layout["tensors"]), dtype=getattr(torch, layout["dtype"]),
                       device=device)


def unflatten_bucket(flat: torch.Tensor, layout: dict) -> list[tuple[str, torch.Tensor]]:
    """The tensors of one buffer made by flatten_bucket (views into it)."""
    out, offset = [], 0
    for name, shape, numel in layout["tensors"]:
        out.append((name, flat[offset:offset + numel].view(shape)))
        offset += numel
    return out
