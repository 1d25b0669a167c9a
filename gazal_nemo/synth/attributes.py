"""Per-example attribute draws: module, categorical attributes, confounding factors.

Every draw is a counter-based uniform, u = blake2b(seed, example index, attribute name) / 2^64,
not a step of a shared random stream. So example i gets the same attributes whether it is
drawn first or last, in shard 3 of 8 or in a resumed run, and adding a factor to the recipe
changes no other attribute of any example. Factors are drawn independently of each other
and of everything else (the paper: "each sampled independently per case"); a module's own
factors are drawn only for cases of that module, so their rates hold within the module.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def uniform(seed: int, index: int, name: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, example index, attribute name)."""
    digest = hashlib.blake2b(f"{seed}\x1f{index}\x1f{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def choose(weights: dict[str, float], u: float) -> str:
    """The value whose cumulative-weight interval holds u (weights sum to 1)."""
    total = 0.0
    last = None
    for value, weight in weights.items():
        if weight <= 0:
            continue
        total += weight
        last = value
        if u < total:
            return value
    return last  # u within rounding of 1


@dataclass(frozen=True)
class CaseAttributes:
    """What example `index` is about (stored with the example, for audit)."""

    index: int
    module: str
    categorical: dict[str, str]
    module_factors: dict[str, bool]
    """The module's own confounding factors: on or off."""
    factors: dict[str, bool]
    """Cross-cutting factors: on or off."""

    def to_json(self) -> dict:
        return {"module": self.module, **self.categorical, "module_factors": dict(self.module_factors),
                "factors": dict(self.factors)}


def draw_attributes(design, seed: int, index: int) -> CaseAttributes:
    module = choose({name: m.weight for name, m in design.modules.items()}, uniform(seed, index, "module"))
    categorical = {name: choose(cat.weights, uniform(seed, index, f"categorical/{name}"))
                   for name, cat in design.categorical.items()}
    module_factors = {name: uniform(seed, index, f"factor/{module}/{name}") < factor.rate
                      for name, factor in design.modules[module].factors.items()}
    factors = {name: uniform(seed, index, f"factor/{name}") < factor.rate for name, factor in design.factors.items()}
    return CaseAttributes(index=index, module=module, categorical=categorical, module_factors=module_factors,
                          factors=factors)


@dataclass(frozen=True)
class Target:
    """A rate the design asks for, and the cases it is a rate of."""

    key: str
    """`module=diagnostic_reasoning`, `complexity=high`, `diagnostic_reasoning/rare_condition`, `comorbidities`."""
    rate: float
    module: str | None = None
    """The rate holds among cases of this module (None: among all cases)."""


def targets(design) -> list[Target]:
    out = [Target(f"module={name}", m.weight) for name, m in design.modules.items()]
    for name, cat in design.categorical.items():
        out += [Target(f"{name}={value}", weight) for value, weight in cat.weights.items()]
    for module_name, module in design.modules.items():
        out += [Target(f"{module_name}/{name}", f.rate, module=module_name) for name, f in module.factors.items()]
    out += [Target(name, f.rate) for name, f in design.factors.items()]
    return out


def has(attrs: dict, key: str) -> bool:
    """Whether stored attributes (CaseAttributes.to_json) have the target `key`."""
    if "=" in key:
        name, value = key.split("=", 1)
        return attrs.get(name) == value
    if "/" in key:
        module, name = key.split("/", 1)
        return attrs.get("module") == module and bool(attrs.get("module_factors", {}).get(name))
    return bool(attrs.get("factors", {}).get(key))


def tally(design, attribute_rows: list[dict]) -> list[dict]:
    """Per target: cases counted (`num_cases`) and cases with it (`num_with`)."""
    rows = []
    per_module = {}
    for attrs in attribute_rows:
        per_module[attrs["module"]] = per_module.get(attrs["module"], 0) + 1
    for target in targets(design):
        population = len(attribute_rows) if target.module is None else per_module.get(target.module, 0)
        count = sum(has(attrs, target.key) for attrs in attribute_rows)
        rows.append({"key": target.key, "target": target.rate, "module": target.module, "num_cases": population,
                     "num_with": count})
    return rows
