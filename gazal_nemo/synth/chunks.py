"""The run folder of a synthesis run: chunk files, the run's identity and the shard locks.

    <output_dir>/run.json                      what the run generates (the recipe keys that shape its data)
    <output_dir>/chunks/chunk-000012.jsonl     one finished chunk: its records, then a footer line
    <output_dir>/chunks/.chunk-000012.jsonl.partial   a chunk being generated (never read as data)
    <output_dir>/locks/shard-0-of-8.json       the process generating shard 0 of 8 (ownership marker)

Chunk c holds examples [c * chunk_size, (c + 1) * chunk_size). Records are appended to the
partial file as examples finish; when the chunk is done a footer (the chunk, its index
range, its counters) is appended, the file is fsynced and renamed to its final name, so a
chunk file exists only complete. Reading checks the footer and that every index of the
range is there exactly once: a file damaged afterwards (a truncated copy) is reported and
generated again, never counted. A partial file left by a killed run is removed when the
chunk is generated again.

Shard k of n takes the chunks c with c % n == k, so a run can be resumed with another
number of shards. `run.json` holds the recipe keys that decide what is generated: a resume
with any of them changed is refused, naming them (transport settings, dedup and decontam
may change).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from gazal_nemo.config_io import to_dict

FOOTER = "footer"
# Recipe keys that may change between the runs of one output folder (they do not change what is generated).
FREE_KEYS = ("name", "output_dir", "rows_per_file", "generator.tp", "generator.vllm", "generator.openai", "dedup",
             "decontam")
LOCK_STALE_S = 900.0
"""A lock from another host whose heartbeat is older than this is taken as left by a dead process."""


def chunk_path(output_dir: Path, chunk: int) -> Path:
    return Path(output_dir) / "chunks" / f"chunk-{chunk:06d}.jsonl"


def partial_path(output_dir: Path, chunk: int) -> Path:
    final = chunk_path(output_dir, chunk)
    return final.with_name(f".{final.name}.partial")


def chunk_range(recipe, chunk: int) -> range:
    start = chunk * recipe.chunk_size
    return range(start, min(start + recipe.chunk_size, recipe.num_examples))


def shard_chunks(recipe, shard: int, num_shards: int) -> list[int]:
    return [c for c in range(recipe.num_chunks) if c % num_shards == shard]


class ChunkDamaged(ValueError):
    """A chunk file with a final name that is not a whole chunk."""


@dataclass
class Chunk:
    """A finished chunk: its records by kind and its footer."""

    examples: list[dict]
    """One per index of the chunk: status kept or failed."""
    rejected: list[dict]
    """Every rejected attempt (several per example when retried)."""
    footer: dict


class ChunkWriter:
    """Appends a chunk's records to its partial file, then makes it whole with a footer and a rename."""

    def __init__(self, output_dir: Path, chunk: int):
        self.final = chunk_path(output_dir, chunk)
        self.partial = partial_path(output_dir, chunk)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.partial, "w", encoding="utf-8")  # truncates what a killed run left

    def write(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()

    def finish(self, footer: dict) -> Path:
        self.write({"type": FOOTER, **footer})
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.partial, self.final)
        _fsync_dir(self.final.parent)
        return self.final

    def abandon(self) -> None:
        if not self.handle.closed:
            self.handle.close()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_chunk(path: Path, expected: range) -> Chunk:
    """A chunk file's records; ChunkDamaged when it is not exactly the examples of `expected` plus a footer."""
    examples, rejected, footer = [], [], None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ChunkDamaged(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ChunkDamaged(f"{path} line {number}: not JSON (a truncated or damaged file)") from None
        kind = record.get("type") if isinstance(record, dict) else None
        if footer is not None:
            raise ChunkDamaged(f"{path} line {number}: a record after the footer")
        if kind == FOOTER:
            footer = record
        elif kind == "example":
            examples.append(record)
        elif kind == "rejected":
            rejected.append(record)
        else:
            raise ChunkDamaged(f"{path} line {number}: unknown record type {kind!r}")
    if footer is None:
        raise ChunkDamaged(f"{path}: no footer (a truncated file)")
    indices = [e.get("index") for e in examples]
    if footer.get("start") != expected.start or footer.get("stop") != expected.stop or sorted(indices) != list(expected):
        raise ChunkDamaged(f"{path}: holds {len(indices)} examples, expected indices {expected.start}.."
                           f"{expected.stop - 1} once each")
    return Chunk(examples=examples, rejected=rejected, footer=footer)


def chunk_done(output_dir: Path, recipe, chunk: int) -> bool:
    """Whether the chunk's final file exists and reads whole (a damaged one is set aside, with a line)."""
    path = chunk_path(output_dir, chunk)
    if not path.is_file():
        return False
    try:
        read_chunk(path, chunk_range(recipe, chunk))
    except ChunkDamaged as e:
        aside = path.with_name(f".{path.name}.damaged")
        os.replace(path, aside)
        print(f"synth: {e}; moved to {aside.name}, generating chunk {chunk} again", flush=True)
        return False
    return True


# --- identity -------------------------------------------------------------------------------


def _flatten(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def run_identity(recipe) -> dict:
    """The recipe keys that decide what is generated (all but FREE_KEYS), flattened."""
    flat = _flatten(to_dict(recipe))
    return {key: value for key, value in flat.items()
            if not any(key == free or key.startswith(free + ".") for free in FREE_KEYS)}


def check_identity(output_dir: Path, recipe) -> bool:
    """True when the folder already holds this run; ValueError naming the keys when it holds another."""
    path = Path(output_dir) / "run.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: unreadable; it is not a synthesis run folder, or a damaged one") from None
    current = run_identity(recipe)
    changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if changed:
        shown = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"[:160] for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ValueError(f"output_dir={str(output_dir)!r} holds a run made with other settings: {shown}{more}; "
                         "use another output_dir, or the settings of that run")
    return True


def write_identity(output_dir: Path, recipe) -> None:
    path = Path(output_dir) / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".run.json.partial")
    tmp.write_text(json.dumps({"identity": run_identity(recipe), "num_chunks": recipe.num_chunks}, indent=1) + "\n")
    os.replace(tmp, path)


# --- shard locks ----------------------------------------------------------------------------


def _lock_path(output_dir: Path, shard: int, num_shards: int) -> Path:
    return Path(output_dir) / "locks" / f"shard-{shard}-of-{num_shards}.json"


def _overlaps(name: str, shard: int, num_shards: int) -> bool:
    """Whether the shard of lock file `name` can share chunks with shard `shard` of `num_shards`."""
    try:
        other, other_count = (int(x) for x in name.removeprefix("shard-").removesuffix(".json").split("-of-"))
    except ValueError:
        return True
    return not (other_count == num_shards and other != shard)


def check_shard_free(output_dir: Path, shard: int, num_shards: int) -> list[Path]:
    """The overlapping locks left by processes that are gone; ValueError naming a live one (the dry
    run calls this too, so it refuses what the run refuses)."""
    from gazal_nemo.ownership import describe_owner, owner_gone

    stale = []
    for path in sorted((Path(output_dir) / "locks").glob("shard-*.json")):
        if not _overlaps(path.name, shard, num_shards):
            continue
        try:
            owner, mtime = json.loads(path.read_text()), path.stat().st_mtime
        except (OSError, ValueError):
            owner, mtime = None, 0.0
        if owner is not None and owner_gone(owner, heartbeat_mtime=mtime, stale_after_s=LOCK_STALE_S) is None:
            raise ValueError(f"output_dir={str(output_dir)!r}: {path.name} is held by "
                             f"{describe_owner(owner, heartbeat_mtime=mtime)}; wait for it or stop it (two processes "
                             "must not generate the same chunks)")
        stale.append(path)
    return stale


def take_shard(output_dir: Path, shard: int, num_shards: int) -> Path:
    """Claim shard `shard` of `num_shards`; ValueError when a live process holds an overlapping one."""
    from gazal_nemo.ownership import this_process

    locks = Path(output_dir) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    mine = _lock_path(output_dir, shard, num_shards)
    for path in check_shard_free(output_dir, shard, num_shards):
        print(f"synth: taking over {path.name}: its process is gone", flush=True)
        path.unlink(missing_ok=True)
    try:  # exclusive: of two processes starting together, one gets the shard
        fd = os.open(mine, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ValueError(f"output_dir={str(output_dir)!r}: {mine.name} was claimed by another process just now; "
                         "two processes must not generate the same chunks") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(this_process()) + "\n")
    return mine


def release_shard(lock: Path) -> None:
    lock.unlink(missing_ok=True)


def heartbeat(lock: Path) -> None:
    try:
        os.utime(lock)
    except OSError:
        pass


def keep_alive(lock: Path, interval_s: float = 60.0) -> threading.Event:
    """Refresh the lock's heartbeat every interval_s from a daemon thread until the event is set
    (a round of a large chunk can outlast LOCK_STALE_S; the process holding the lock cannot)."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval_s):
            heartbeat(lock)

    threading.Thread(target=beat, name="synth-lock-heartbeat", daemon=True).start()
    return stop
