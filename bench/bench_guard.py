"""The collapse guard's benchmark: every induced collapse type and healthy runs over several
seeds on the tiny CPU pipeline. Per type: steps from the onset to the rollback, which rules
fired, how far the policy went, whether the run ended at its pre-collapse accuracy; healthy:
false alarms per 1,000 judged steps. Results go to docs/GRPO.md by hand (the table this script
prints) with the plots it draws, one per type.

    python bench/bench_guard.py                                  # all of it (~50 min on 2 CPU cores)
    python bench/bench_guard.py --cases markup,healthy --seeds 1 --healthy-seeds 1
    python bench/bench_guard.py --report --plots-dir docs   # tables and plots of every run recorded so far
    python bench/bench_guard.py --report --rates 1e-2,1e-3,1e-4,1e-5   # + every run replayed at other rates

Settings (gazal_nemo/testing/guard_bench.py): the tiny Qwen3 after 130 SFT steps on answers
with a bold word (35% written with every word in bold), the tiny GRPO recipe
(recipes/tiny_cpu_grpo.yaml) at sampling temperature 1.0, the guard's defaults, checkpoints
every 5 steps; a collapse case pays for its behaviour from step `--first` to `--last`
(wall-clock steps, so a rollback leaves the window behind), for `--steps` steps in all.
Writes <out-dir>/guard/<case>_seed<k>/logs, <out-dir>/bench_guard.jsonl (one record a run),
<out-dir>/bench_guard.md (the tables) and <plots-dir>/guard_<type>.svg (the first run of each type).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gazal_nemo.testing.guard_bench import (  # noqa: E402
    BENCH_OVERRIDES,
    CASES,
    collapse_env,
    grpo_overrides,
    judge_run,
    judged_steps,
    seen_rows,
    twin_worst,
)

BENCH = "bench_guard"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--seeds", default="1,2,3", help="train.seed values of each collapse case")
    parser.add_argument("--healthy-seeds", default="1,2,3,4,5,6,7,8", help="train.seed values of the healthy runs")
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps of a collapse run")
    parser.add_argument("--healthy-steps", type=int, default=60, help="GRPO steps of a healthy run")
    parser.add_argument("--first", type=int, default=16, help="first step the collapse reward pays")
    parser.add_argument("--last", type=int, default=25, help="last step the collapse reward pays")
    parser.add_argument("--out-dir", default="runs/bench")
    parser.add_argument("--plots-dir", default=None, help="where guard_<case>.svg go (default: the out-dir)")
    parser.add_argument("--rates", default=None, help="with --report: also replay every recorded run at these "
                        "grpo.guard.false_alarm_rate values (comma-separated), e.g. 1e-2,1e-3,1e-4,1e-5")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the tables of every record in <out-dir>/bench_guard.jsonl (and the plots "
                             "of each type's first record, with --plots-dir)")
    args = parser.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rates.split(",")] if args.rates else []
    except ValueError:
        parser.error(f"--rates: {args.rates!r} is not a comma-separated list of numbers")
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; allowed: {', '.join(CASES)}")
    return args


def _cli(args: list[str], *, env: dict | None = None, log: Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "gazal_nemo.cli", *args], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
    return proc.returncode


def prepare_model(work: Path) -> dict:
    """The tiny Qwen3 after SFT on markdown answers (as tests/e2e/test_grpo_guard.py makes it); reused when present."""
    from gazal_nemo.commands.demo_data import fact_mcq_rows
    from gazal_nemo.testing.collapse import markdown_sft_rows
    from gazal_nemo.testing.tiny import make_tiny_qwen3, write_jsonl

    merged = work / "sft" / "export" / "merged"
    grpo = work / "grpo.jsonl"
    if not (merged / "config.json").is_file():
        base = make_tiny_qwen3(work / "base", seed=0)
        sft = write_jsonl(work / "sft.jsonl", markdown_sft_rows(256, seed=0))
        write_jsonl(grpo, fact_mcq_rows(256, seed=7))
        rc = _cli(["sft", "--recipe", "recipes/tiny_cpu_sft.yaml", f"model.hf_path={base}",
                   f"sft_data.sources.0.path={sft}", "train.max_steps=130", f"checkpoint.dir={work / 'sft' / 'ckpt'}",
                   f"logging.dir={work / 'sft' / 'logs'}", f"export_dir={work / 'sft' / 'export'}"],
                  log=work / "sft" / "stdout.log")
        if rc != 0:
            raise SystemExit(f"bench_guard: SFT failed (exit {rc}); see {work / 'sft' / 'stdout.log'}")
    return {"model": merged, "grpo": grpo}


def run_case(name: str, seed: int, *, model: dict, work: Path, args) -> dict:
    case = CASES[name]
    steps = args.healthy_steps if case.healthy else args.steps
    run = work / f"{name}_seed{seed}"
    start = time.time()
    rc = _cli(["grpo", "--recipe", "recipes/tiny_cpu_grpo.yaml", f"model.hf_path={model['model']}",
               f"grpo.data.path={model['grpo']}", f"train.max_steps={steps}", "checkpoint.save_every=5",
               f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'logs'}", "export_dir=null",
               *BENCH_OVERRIDES, *grpo_overrides(case, seed=seed)],
              env=collapse_env(args.first, args.last), log=run / "stdout.log")
    record = judge_run(run / "logs", case, first=args.first, last=args.last)
    record.update(seed=seed, exit_code=rc, wall_s=round(time.time() - start, 1), log_dir=str(run / "logs"),
                  judged_steps=judged_steps(record["steps"]) if case.healthy else None)
    subprocess.run(["rm", "-rf", str(run / "ckpt")], check=False)  # the logs are what is kept
    return record


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _healthy_worsts(record: dict, healthy: list[dict], *, first: int) -> tuple[float | None, float | None]:
    """(the healthy twin's worst value of the record's signal over the same steps, the worst of
    every healthy run over them): how far healthy training alone moved it."""
    case = CASES[record["case"]]
    worsts = {h["seed"]: twin_worst(h["log_dir"], case, first=first, last_step=record["steps"]) for h in healthy}
    known = [w for w in worsts.values() if w is not None]
    every = (max(known) if case.bad == "up" else min(known)) if known else None
    return worsts.get(record["seed"]), every


def beyond_healthy(record: dict, every: float | None) -> bool | None:
    """Whether the run's signal went past every healthy run's worst over the same steps: a run
    that stayed inside that range cannot be told from healthy training by its signal alone."""
    if every is None or record.get("signal_worst") is None:
        return None
    return record["signal_worst"] > every if CASES[record["case"]].bad == "up" else record["signal_worst"] < every


def tables(records: list[dict], env: dict, *, first: int) -> str:
    order = list(CASES)
    collapses = sorted((r for r in records if r["case"] != "healthy"), key=lambda r: (order.index(r["case"]), r["seed"]))
    healthy = [r for r in records if r["case"] == "healthy"]
    lines = [f"Device: {env['device']}; date {env['date']}; commit {env['commit']}.", "",
             "| type | seed | signal: before -> worst (healthy twin's worst; every healthy run's worst) "
             "| beyond the healthy range | onset -> rollback (steps) "
             "| rules that fired | rollbacks | accuracy before -> worst -> end | restored (>= before - 0.1) |",
             "|---|---|---|---|---|---|---|---|---|"]
    beyond_runs = []
    for r in collapses:
        fired = f"{r['delay']} (step {r['detected_at']})" if r["delay"] is not None else "not detected"
        twin, every = _healthy_worsts(r, healthy, first=first)
        beyond = beyond_healthy(r, every)
        if beyond:
            beyond_runs.append(r)
        lines.append(f"| {r['case']} | {r['seed']} | {r['signal']} {_fmt(r['signal_pre'])} -> {_fmt(r['signal_worst'])} "
                     f"({_fmt(twin)}; {_fmt(every)}) | {_fmt(beyond)} "
                     f"| {fired} | {', '.join(r['rules']) or '-'} | {r['rollbacks']}"
                     f"{' (gave up)' if r['exit_code'] == 3 else ''} | {_fmt(r['accuracy_pre'])} -> "
                     f"{_fmt(r.get('accuracy_worst'))} -> {_fmt(r['accuracy_end'])} | {_fmt(r.get('restored'))} |")
    if collapses:
        lines += ["", f"Detected: {sum(r['delay'] is not None for r in collapses)} of {len(collapses)} collapse runs; "
                  f"{sum(r['delay'] is not None for r in beyond_runs)} of the {len(beyond_runs)} whose signal went "
                  "beyond every healthy run's worst over the same steps."]
    if healthy:
        judged = sum(r["judged_steps"] for r in healthy)
        alarms = sum(r["false_alarms"] for r in healthy)
        lines += ["", "| healthy runs | steps each | judged steps | false alarms | per 1,000 judged steps |",
                  "|---|---|---|---|---|",
                  f"| seeds {', '.join(str(r['seed']) for r in healthy)} | {healthy[0]['steps']} | {judged} | {alarms} "
                  f"| {1000 * alarms / judged if judged else float('nan'):.1f} |"]
    return "\n".join(lines) + "\n"


def rate_table(records: list[dict], rates: list[float], *, first: int) -> str:
    """Every recorded run replayed through the guard at each rate (`gazal guard`'s replay): healthy
    runs in full, collapse runs up to the live guard's first rollback (what it had seen then; a
    stricter rate that fires later than that cannot be told from the logs and counts as missed)."""
    from gazal_nemo.commands.guard import recipe_guard
    from gazal_nemo.recipe import load_recipe
    from gazal_nemo.rl.guard_replay import replay

    lines = ["| false_alarm_rate | healthy runs rolled back | false rollbacks per 1,000 judged healthy steps "
             "| collapse runs caught within the steps seen | onset -> rollback: median (max) | rolled back before the onset |",
             "|---|---|---|---|---|---|"]
    healthy = [seen_rows(r["log_dir"]) for r in records if r["case"] == "healthy"]  # read once, replayed per rate
    collapses = [seen_rows(r["log_dir"]) for r in records if r["case"] != "healthy"]
    for rate in rates:
        config, rules = recipe_guard(load_recipe(ROOT / "recipes" / "tiny_cpu_grpo.yaml",
                                                 [f"grpo.guard.false_alarm_rate={rate}"]))
        judged = alarms = runs_alarmed = 0
        for rows in healthy:
            report = replay(rows, config, rules)
            judged, alarms = judged + report.judged, alarms + len(report.rollbacks)
            runs_alarmed += bool(report.rollbacks)
        delays, early = [], 0
        for rows in collapses:
            fired = [step for step, _ in replay(rows, config, rules).rollbacks]
            early += any(step < first for step in fired)
            after = [step - first for step in fired if step >= first]
            if after:
                delays.append(after[0])
        delays.sort()
        median = f"{delays[len(delays) // 2]} ({delays[-1]})" if delays else "-"
        lines.append(f"| {rate:g} | {runs_alarmed} of {len(healthy)} | {1000 * alarms / judged if judged else float('nan'):.1f} "
                     f"| {len(delays)} of {len(collapses)} | {median} | {early} |")
    return "\n".join(lines) + "\n"


def plot(record: dict, out: Path, *, first: int, last: int) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from plot_guard_run import render

    case = CASES[record["case"]]
    metrics = ["reward/accuracy"] + ([case.signal] if case.signal != "reward/accuracy" else [])
    out.write_text(render(Path(record["log_dir"]), metrics, window=None if case.healthy else (first, last)))


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    work = out_dir / "guard"
    env = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
           "date": datetime.date.today().isoformat(),
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip() or None}
    if args.report:
        records = [json.loads(line) for line in (out_dir / f"{BENCH}.jsonl").read_text().splitlines() if line.strip()]
        env = {k: records[0][k] for k in ("device", "date", "commit")}
        # Judged again from the logs, so the tables follow the current judge_run.
        records = [dict(r, **judge_run(r["log_dir"], CASES[r["case"]], first=args.first, last=args.last))
                   for r in records]
    else:
        model = prepare_model(work)
        records = []
        for name in args.cases.split(","):
            seeds = args.healthy_seeds if CASES[name].healthy else args.seeds
            for seed in (int(s) for s in seeds.split(",") if s):
                record = dict(run_case(name, seed, model=model, work=work, args=args), **env)
                print("BENCH_JSON " + json.dumps(record), flush=True)
                with open(out_dir / f"{BENCH}.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                records.append(record)
    if args.plots_dir or not args.report:
        plots = Path(args.plots_dir) if args.plots_dir else out_dir
        plots.mkdir(parents=True, exist_ok=True)
        for name in dict.fromkeys(r["case"] for r in records if r["case"] != "healthy"):
            plot(next(r for r in records if r["case"] == name), plots / f"guard_{name}.svg", first=args.first,
                 last=args.last)
    text = tables(records, env, first=args.first)
    if args.rates:
        text += "\n" + rate_table(records, args.rates, first=args.first)
    (out_dir / f"{BENCH}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
