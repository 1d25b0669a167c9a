"""Typed recipes: YAML -> nested keyword-only dataclasses, plus dotted CLI overrides.

Every key is checked against the schema: an unknown key, a wrong type, a number that is
not finite or a value outside a Literal's choices raises ValueError naming the dotted key
and what is allowed. Nothing is silently created, and nothing is silently dropped: a key
or section written twice in a recipe is refused with both line numbers (YAML itself keeps
the last one without a word). Overrides (`train.lr=1e-6 parallel.tp=2`) are parsed as
YAML scalars and merged before validation, so they get exactly the same checks.

Range and cross-key rules live in each section's `__post_init__` and name keys as the
recipe writes them (`grpo.loss.eps_low`). A section that can sit at several places (a list
element such as `sft_data.sources[0]`) declares its default place in `KEY_PREFIX`, and
`from_dict` rewrites that prefix to the place it was actually read from.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


def _describe(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {_describe(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / .nan / "inf": no recipe number means "unbounded"
            raise ValueError(f"{key}={value!r}; allowed: a finite number")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"{key}: unsupported schema type {tp}")


def from_dict(cls, data: dict, *, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, validating every key recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ValueError(f"unknown key {where}{unknown[0]}; allowed keys{' in ' + prefix if prefix else ''}: "
                         f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default was left out
        raise ValueError(f"{prefix or cls.__name__}: {e}") from None
    except ValueError as e:
        default = getattr(cls, "KEY_PREFIX", None)
        if default and prefix and prefix != default:  # a list element: name the element it is
            raise ValueError(str(e).replace(f"{default}.", f"{prefix}.")) from None
        raise


def to_dict(obj) -> Any:
    """Plain-data form of a config (for logging and for writing next to checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r}: bad key {key!r}")
    try:
        return key.split("."), yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: value is not valid YAML: {' '.join(str(e).split())}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge dotted `key=value` overrides into a nested dict (validation happens later)."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = _child(node, part, text)
        if isinstance(node, list):
            node[_list_index(node, path[-1], text)] = value
        else:
            node[path[-1]] = value
    return data


def _list_index(node: list, part: str, text: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override {text!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _child(node, part: str, text: str):
    """Step into section `part` (a list element when `part` is an index), creating sections."""
    if isinstance(node, list):
        child = node[_list_index(node, part, text)]
    else:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise ValueError(f"override {text!r}: {part} is not a section")
    return child


def require_file(path: str | Path, what: str) -> Path:
    """`path` if it is a readable regular file; else FileNotFoundError / ValueError saying what it is instead.

    One place for the ways a user-given input path goes wrong (missing, a folder, a symlink
    loop, a dangling link, no permission), so every reader names the file the same way.
    """
    path = Path(path).expanduser()
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"{what} {path}: a symlink loop") from None
        if path.is_symlink():
            raise FileNotFoundError(f"{what} {path}: a broken symlink (to {os.readlink(path)})") from None
        if e.errno == errno.ENOTDIR:
            raise FileNotFoundError(f"{what} {path} does not exist (a parent of it is a file)") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(f"{what} {path} does not exist") from None
        raise ValueError(f"{what} {path}: {e.strerror}") from None
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {path}: not readable (permission denied)")
    return path


def require_writable_dir(path: str | Path, key: str) -> Path:
    """`path` if it is a folder, or can be made one: no part of it is a file and the nearest
    existing folder is writable. Checked at start so a bad output location fails before
    training, not at the first save hours later. Creates nothing."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if probe.is_symlink() and not probe.exists():
        raise ValueError(f"{key}={str(path)!r}: {probe} is a broken symlink or a symlink loop")
    if not probe.is_dir():
        where = "is a file, not a folder" if probe == path else f"cannot be created: {probe} is a file"
        raise ValueError(f"{key}={str(path)!r}: {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(path)!r}: cannot write in {probe} (permission denied)")
    return path


def load_yaml(path: str | Path) -> dict:
    path = require_file(path, "recipe")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path}: not UTF-8 text (byte {e.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        repeated = first_repeated_key(node) if node is not None else None
        if repeated is not None:
            key, first_line, second_line = repeated
            raise ValueError(f"recipe {path}: {key} is given twice (line {first_line} and line {second_line}); "
                             "YAML would keep only the second: write it once")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path}: not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    if data is None:
        raise ValueError(f"recipe {path} is empty (no sections)")
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: top level must be a mapping of sections, got a {type(data).__name__}")
    return data


def first_repeated_key(node: yaml.Node) -> tuple[str, int, int] | None:
    """(dotted key, first line, second line) of the key a YAML mapping gives twice, lines from 1;
    of several, the one whose repeat comes first in the file. None when every key is unique."""
    found: list[tuple[int, str, int]] = []
    seen_nodes: set[int] = set()  # an alias points at a node already walked

    def walk(current: yaml.Node, path: str) -> None:
        if id(current) in seen_nodes:
            return
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    walk(value_node, path)
                    continue
                key, line = key_node.value, key_node.start_mark.line + 1
                if key in lines:
                    found.append((line, f"{path}{key}", lines[key]))
                lines.setdefault(key, line)
                walk(value_node, f"{path}{key}.")
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, f"{path.rstrip('.')}[{index}].")

    walk(node, "")
    if not found:
        return None
    second_line, key, first_line = min(found)
    return key, first_line, second_line
