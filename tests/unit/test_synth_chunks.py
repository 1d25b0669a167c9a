"""Chunk files and shard locks: a chunk exists only whole, a damaged one is never counted, and two
live processes never generate the same chunks. Deduplication against a brute-force reference."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from gazal_nemo.synth.chunks import (
    ChunkDamaged,
    ChunkWriter,
    check_shard_free,
    chunk_done,
    chunk_path,
    partial_path,
    read_chunk,
    release_shard,
    shard_chunks,
    take_shard,
)
from gazal_nemo.synth.config import DedupConfig, load_synth_recipe
from gazal_nemo.synth.dedup import deduplicate, jaccard, shingles

ROOT = Path(__file__).resolve().parents[2]
RECIPE = load_synth_recipe(ROOT / "recipes" / "tiny_cpu_synth.yaml", ["generator.model=x", "num_examples=10"])


def _write(folder, chunk, indices, *, finish=True):
    writer = ChunkWriter(folder, chunk)
    for index in indices:
        writer.write({"type": "rejected", "index": index, "reasons": ["empty: no text"]})
        writer.write({"type": "example", "status": "kept", "index": index})
    if finish:
        writer.finish({"chunk": chunk, "start": min(indices), "stop": max(indices) + 1, "counters": {}})
    else:
        writer.abandon()


def test_a_chunk_is_whole_or_absent(tmp_path):
    _write(tmp_path, 1, range(4, 8), finish=False)
    assert partial_path(tmp_path, 1).is_file() and not chunk_path(tmp_path, 1).exists()
    assert not chunk_done(tmp_path, RECIPE, 1)
    _write(tmp_path, 1, range(4, 8))
    assert not partial_path(tmp_path, 1).exists()
    chunk = read_chunk(chunk_path(tmp_path, 1), range(4, 8))
    assert [e["index"] for e in chunk.examples] == [4, 5, 6, 7] and len(chunk.rejected) == 4
    assert chunk_done(tmp_path, RECIPE, 1)
    _write(tmp_path, 2, range(8, 10))  # the last chunk is short (num_examples 10)
    assert chunk_done(tmp_path, RECIPE, 2)


@pytest.mark.parametrize("damage", ["drop_footer", "cut_mid_line", "drop_example", "duplicate_example"])
def test_a_damaged_chunk_is_never_counted(tmp_path, damage):
    _write(tmp_path, 0, range(0, 4))
    path = chunk_path(tmp_path, 0)
    lines = path.read_text().splitlines()
    if damage == "drop_footer":
        lines = lines[:-1]
    elif damage == "cut_mid_line":
        lines[-1] = lines[-1][:10]
    elif damage == "drop_example":
        lines = [line for line in lines if json.loads(line).get("type") != "example" or json.loads(line)["index"] != 2]
    else:
        lines.insert(1, lines[1])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ChunkDamaged):
        read_chunk(path, range(0, 4))
    assert not chunk_done(tmp_path, RECIPE, 0)  # set aside, to be generated again
    assert not path.exists() and path.with_name(f".{path.name}.damaged").exists()


def test_shards_split_the_chunks():
    recipe = load_synth_recipe(ROOT / "recipes" / "tiny_cpu_synth.yaml", ["generator.model=x", "num_examples=41"])
    assert recipe.num_chunks == 11
    shards = [shard_chunks(recipe, k, 3) for k in range(3)]
    assert sorted(c for shard in shards for c in shard) == list(range(11)) and shards[1] == [1, 4, 7, 10]


def test_a_live_process_keeps_its_shard(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from gazal_nemo.ownership import process_start, this_process

        owner = dict(this_process(), pid=holder.pid, start=process_start(holder.pid))
        (tmp_path / "locks").mkdir()
        (tmp_path / "locks" / "shard-0-of-1.json").write_text(json.dumps(owner))
        with pytest.raises(ValueError, match=f"shard-0-of-1.json is held by pid {holder.pid}"):
            take_shard(tmp_path, 0, 1)
        with pytest.raises(ValueError, match="held by"):
            take_shard(tmp_path, 1, 2)  # another layout overlaps its chunks
        with pytest.raises(ValueError, match="held by"):
            check_shard_free(tmp_path, 0, 1)  # what the dry run checks, without taking anything
    finally:
        holder.kill()
        holder.wait()
    lock = take_shard(tmp_path, 0, 1)  # its owner is gone: taken over
    assert json.loads(lock.read_text())["pid"] != holder.pid
    release_shard(lock)
    first, second = take_shard(tmp_path, 0, 2), take_shard(tmp_path, 1, 2)  # disjoint shards coexist
    assert first.exists() and second.exists()


# --- dedup ------------------------------------------------------------------------------------


def _text(rng, words=80):
    vocabulary = [f"w{i}" for i in range(3000)]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_dedup_finds_exact_and_near_duplicates_like_brute_force():
    rng = random.Random(0)
    texts = [_text(rng) for _ in range(60)]
    texts.append(texts[3].upper())  # exact after normalisation
    near = texts[10].split()
    near[40] = "changed"
    texts.append(" ".join(near))  # one word changed: Jaccard of 5-shingles ~ 0.87
    far = texts[20].split()
    for position in range(0, 80, 8):
        far[position] = "other"
    texts.append(" ".join(far))  # ten words changed: Jaccard well below 0.8
    cfg = DedupConfig()
    removed = deduplicate(texts, cfg)
    assert removed == {60: ("exact", 3), 61: ("near", 10)}
    cache = {}
    grams = [shingles(t, cfg.shingle_words, cache) for t in texts]
    kept = [i for i in range(len(texts)) if i not in removed]
    brute = [(i, j) for i in kept for j in kept if i < j and jaccard(grams[i], grams[j]) >= cfg.near_duplicate_jaccard]
    assert brute == []
    assert 0.8 <= jaccard(grams[10], grams[61]) < 1 and jaccard(grams[20], grams[62]) < 0.5
    assert deduplicate(texts, DedupConfig(near_duplicate_jaccard=1.0)) == {60: ("exact", 3)}


def test_jaccard_of_shingles():
    cache = {}
    a, b = shingles("a b c d e f", 5, cache), shingles("a b c d e g", 5, cache)
    assert len(a) == 2 and jaccard(a, b) == pytest.approx(1 / 3)
    assert len(shingles("too short", 5, cache)) == 1
