"""Process groups: torch.distributed + megatron-core model-parallel state.

One entry point for every launcher we support: `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK),
Slurm `srun` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR from the job's first
node) and a plain single process. NCCL on GPU, gloo on CPU (where `cpu_compat` makes
megatron-core run).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

_PICKED_PORT_VAR = "GAZAL_PICKED_MASTER_PORT"


@dataclass(frozen=True, kw_only=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                         local_rank=int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                         local_rank=int(env.get("SLURM_LOCALID", 0)))
    return LaunchEnv(rank=0, world_size=1, local_rank=0)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collective_device() -> torch.device:
    """Where a tensor for a collective on the default group must live: the GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_layout(world_size: int, *, tp: int, pp: int, cp: int = 1) -> int:
    """Data-parallel size for this layout; refuses layouts that do not divide the world."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(
            f"parallel.tp*parallel.pp*parallel.cp = {tp}*{pp}*{cp} = {model_parallel} "
            f"does not divide world size {world_size}; allowed: products that divide {world_size}"
        )
    return world_size // model_parallel


def init_parallel(*, tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 0, timeout_min: int = 30) -> LaunchEnv:
    """Start torch.distributed and megatron's parallel state; idempotent within a process."""
    from megatron.core import parallel_state, tensor_parallel

    from gazal_nemo.cpu_compat import enable_cpu_megatron

    env = launch_env()
    check_layout(env.world_size, tp=tp, pp=pp, cp=cp)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_megatron()
    else:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        picked_before = os.environ.get("MASTER_PORT") == os.environ.get(_PICKED_PORT_VAR)
        if env.world_size == 1 and ("MASTER_PORT" not in os.environ or picked_before):
            # A lone process needs no agreed port: a fresh free one keeps concurrent jobs apart.
            os.environ["MASTER_PORT"] = os.environ[_PICKED_PORT_VAR] = str(free_port())
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp,
    )
    # Same CPU seed on the ranks of a TP group (dropout masks on CPU, replicated adapter
    # init), different per pipeline stage, as megatron's own training seeds it.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return env


def shutdown_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
