"""Let megatron-core run on CPU with the gloo backend.

megatron-core assumes CUDA in a handful of places: `torch.cuda.current_device()` as a
device argument, the CUDA RNG state calls of its RNG tracker, `torch.cuda.synchronize`,
`Tensor.cuda()`, `Tensor.type()` name checks and tensor factories called with `device="cuda"`. Tests and the CPU demo
need the real megatron modules, so instead of forking them we redirect exactly those
calls to the CPU, once, when no GPU is present. Nothing here is active on a CUDA machine.

The CUDA RNG tracker gets its own generator state (kept apart from the CPU default
generator, so forking it does not disturb CPU randomness); dropout on CPU therefore draws
from the default generator in every region. Tests use dropout 0 where numbers matter.
"""

from __future__ import annotations

import functools

import torch

_ENABLED = False
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "randint", "zeros_like",
              "empty_like", "ones_like", "full_like")


def _cpu_device(device):
    """Map any CUDA device spec to the CPU; leave others as they are."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    dev = torch.device(device)
    return torch.device("cpu") if dev.type == "cuda" else device


def _redirect_device(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


class _VirtualCudaRng:
    """Stands in for the CUDA generator so megatron's RNG tracker can fork and restore."""

    def __init__(self):
        self.generator = torch.Generator()

    def get_state(self, *args, **kwargs):
        return self.generator.get_state()

    def set_state(self, state, *args, **kwargs):
        self.generator.set_state(state)

    def manual_seed(self, seed, *args, **kwargs):
        self.generator.manual_seed(int(seed))


_DENSE_FLOAT_TYPES = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}


def _cuda_named_type(original_type):
    """megatron's optimizers check `param.type() == 'torch.cuda.FloatTensor'`; answer as CUDA would."""

    @functools.wraps(original_type)
    def type_(self, *args, **kwargs):
        name = original_type(self, *args, **kwargs)
        if not args and not kwargs and name in _DENSE_FLOAT_TYPES:
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    return type_


def enable_cpu_megatron() -> bool:
    """Patch CUDA-only calls to CPU equivalents when CUDA is absent; returns whether patched."""
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    rng = _VirtualCudaRng()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = rng.get_state
    torch.cuda.random.get_rng_state = rng.get_state
    torch.cuda.set_rng_state = rng.set_state
    torch.cuda.manual_seed = rng.manual_seed
    torch.cuda.manual_seed_all = rng.manual_seed
    torch.Tensor.cuda = lambda self, *a, **k: self
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    _original_to = torch.Tensor.to

    def _to(self, *args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        args = tuple(_cpu_device(a) if isinstance(a, str) and a.startswith("cuda") else a for a in args)
        return _original_to(self, *args, **kwargs)

    torch.Tensor.to = _to
    torch.Tensor.type = _cuda_named_type(torch.Tensor.type)

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: rng.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: rng.set_state(state)
    _ENABLED = True
    return True
