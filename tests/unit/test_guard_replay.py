"""`gazal guard`: a finished run's metrics replayed through the collapse guard with a recipe's
settings, as a team sets grpo.guard.false_alarm_rate on its own runs. The recipe decides what
is watched (an unrewarded component is not), the rate decides how large a change must be, and
a bad path or row is one line naming it, before any judging."""

import json
import random

import pytest

from gazal_nemo import cli
from gazal_nemo.rl.guard_signals import MARKUP_METRIC

RECIPE = "recipes/tiny_cpu_grpo.yaml"  # rewards accuracy alone: reward/format is not watched


def _row(step: int, rng: random.Random, **changed) -> dict:
    row = {"step": step, "reward/accuracy": min(1.0, max(0.0, rng.gauss(0.4, 0.04))), "reward/format": rng.gauss(0.9, 0.02),
           MARKUP_METRIC: max(0.0, rng.gauss(0.03, 0.01)), "completion_len_mean": rng.gauss(300, 15),
           "entropy": rng.gauss(0.5, 0.03), "grad_norm": abs(rng.gauss(1.0, 0.2)), "loss": rng.gauss(0, 0.1),
           "truncated_frac": 0.02, "samples/completions": 128.0}
    return dict(row, **changed)


def _logs(tmp_path, rows, *, name: str = "logs", tail: str = "") -> str:
    logs = tmp_path / name
    logs.mkdir()
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(logs)


def _guard(capsys, logs, *overrides):
    code = cli.main(["guard", "--recipe", RECIPE, "--logs", logs, *overrides])
    out = capsys.readouterr()
    return code, out.out, out.err


def _run(collapse_from=None, **collapsed):
    rng = random.Random(0)
    return [_row(step, rng, **(collapsed if collapse_from and step >= collapse_from else {})) for step in range(1, 61)]


def test_a_healthy_run_replays_without_a_rollback_and_shows_how_close_each_rule_came(tmp_path, capsys):
    code, out, _ = _guard(capsys, _logs(tmp_path, _run(), tail='{"step": 61, "rew'))  # torn last line: dropped
    assert code == 0 and out.rstrip().endswith("no rollback")
    assert "60 steps, 41 judged" in out  # decisions from step 20: 5 warm-up + 10 baseline + 5 window
    closest = dict(line.split()[:3:2] for line in out.splitlines() if line.startswith("  ") and "(step" in line)
    assert "reward/accuracy" in closest and "reward/format" not in closest  # what the recipe rewards
    assert all(float(v) < 1 for v in closest.values()), out


def test_a_collapse_replays_to_a_rollback_within_patience_of_its_onset(tmp_path, capsys):
    code, out, _ = _guard(capsys, _logs(tmp_path, _run(40, **{MARKUP_METRIC: 0.35})))
    assert code == 1, out
    fired = [int(line.split()[5].rstrip(":")) for line in out.splitlines() if line.startswith("would roll back")]
    assert len(fired) == 1 and 41 <= fired[0] <= 42, out  # breached from step 40, patience 2
    assert MARKUP_METRIC in out


def test_the_recipe_decides_what_is_watched_and_how_large_a_change_must_be(tmp_path, capsys):
    logs = _logs(tmp_path, _run(40, **{"reward/format": 0.3}))
    assert _guard(capsys, logs)[0] == 0  # format is not rewarded by this recipe: its drift is no collapse
    code, out, _ = _guard(capsys, logs, "grpo.guard.watch_unrewarded=true")
    assert code == 1 and "reward/format" in out
    # A small accuracy dip: within the noise at the default rate, a rollback at a careless one.
    small = _logs(tmp_path, _run(40, **{"reward/accuracy": 0.34}), name="small")
    assert _guard(capsys, small)[0] == 0
    assert _guard(capsys, small, "grpo.guard.false_alarm_rate=0.3")[0] == 1


@pytest.mark.parametrize("problem, expect", [
    ("missing", "no such file"),
    ("bad_row", "metrics.jsonl:2: not a metrics row"),
    ("sft_recipe", "no grpo section"),
    ("bad_key", "grpo.guard.false_alarm_rate"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, capsys, problem, expect):
    logs = str(tmp_path / "nowhere") if problem == "missing" else _logs(tmp_path, _run())
    if problem == "bad_row":
        path = tmp_path / "logs" / "metrics.jsonl"
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    args = ["guard", "--recipe", "recipes/tiny_cpu_sft.yaml" if problem == "sft_recipe" else RECIPE, "--logs", logs]
    code = cli.main(args + (["grpo.guard.false_alarm_rate=0"] if problem == "bad_key" else []))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expect in err, err
