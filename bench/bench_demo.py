"""`gazal demo` end to end, as one benchmark record: wall time, device, peak memory, and
whether the tiny pipeline still learns (SFT loss falls, GRPO accuracy rises).

The demo picks its device itself (CUDA when torch sees one: `init_parallel`), so this
script only runs it in-process, through the real CLI entry point, and reads the metrics
files the stages wrote. `--device cpu` hides the GPU (CUDA_VISIBLE_DEVICES="") before torch
is imported. The learning check is the e2e test's (tests/e2e/test_demo_pipeline.py): SFT
loss ends below a tenth of its start, GRPO accuracy of the last 10 steps is 0.15 above
the first 5. With fewer steps than the defaults it is reported, not meaningful.

    python bench/bench_demo.py                                          # GPU, the full demo
    python bench/bench_demo.py --device cpu --sft-steps 4 --grpo-steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BENCH = "demo"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--sft-steps", type=int, default=130, help="the demo's default: 130")
    parser.add_argument("--grpo-steps", type=int, default=60, help="the demo's default: 60")
    parser.add_argument("--out-dir", default="runs/bench")
    return parser.parse_args(argv)


def _metrics(path: Path, key: str) -> list[float]:
    if not path.is_file():
        return []
    return [json.loads(line)[key] for line in path.read_text().splitlines() if line.strip()]


def learning_summary(work: Path, *, full_length: bool) -> dict:
    """First/last SFT loss and GRPO accuracy from the stages' metrics files."""
    loss = _metrics(work / "sft" / "logs" / "metrics.jsonl", "loss")
    accuracy = _metrics(work / "grpo" / "logs" / "metrics.jsonl", "reward/accuracy")
    out = {"sft_steps_logged": len(loss), "grpo_steps_logged": len(accuracy),
           "sft_loss_first": loss[0] if loss else None, "sft_loss_last": loss[-1] if loss else None,
           "grpo_accuracy_first5": sum(accuracy[:5]) / len(accuracy[:5]) if accuracy else None,
           "grpo_accuracy_last10": sum(accuracy[-10:]) / len(accuracy[-10:]) if accuracy else None}
    if full_length and loss and accuracy:
        out["learned"] = (loss[-1] < 0.1 * loss[0]
                          and out["grpo_accuracy_last10"] >= out["grpo_accuracy_first5"] + 0.15)
    else:
        out["learned"] = "not judged (fewer steps than the demo's defaults)"
    return out


def measure(args, device) -> dict:
    from bench import common
    from gazal_nemo.cli import main as gazal_main

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        work = Path(tmp) / "demo"
        argv = ["demo", "--workdir", str(work), "--sft-steps", str(args.sft_steps),
                "--grpo-steps", str(args.grpo_steps)]
        start = time.perf_counter()
        returncode = gazal_main(argv)
        common.synchronize(device)
        wall = time.perf_counter() - start
        if returncode != 0:
            raise RuntimeError(f"gazal {' '.join(argv)} exited {returncode}")
        full = args.sft_steps >= 130 and args.grpo_steps >= 60
        return {"command": "gazal " + " ".join(argv[:1] + argv[3:]), "wall_s": wall,
                "peak_mem_gib": common.peak_memory_gib(device), **learning_summary(work, full_length=full)}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch sees the GPU
    from bench import common

    device = common.resolve_device(args.device)
    reporter = common.Reporter(BENCH, args.out_dir, device)
    identity = {"variant": "gazal-demo", "shape": "tiny (2 layers, hidden 64)", "sft_steps": args.sft_steps,
                "grpo_steps": args.grpo_steps}
    records = common.run_variants(reporter, [(identity, lambda: measure(args, device))],
                                  args=argparse.Namespace(isolate=False), device=device)
    print(report(reporter, records))
    return records


def report(reporter, records: list[dict]) -> str:
    from bench import common

    rows = [[r.get("status"), r.get("wall_s"), r.get("peak_mem_gib"), r.get("sft_loss_first"), r.get("sft_loss_last"),
             r.get("grpo_accuracy_first5"), r.get("grpo_accuracy_last10"), r.get("learned", r.get("error"))]
            for r in records]
    smoke = " (CPU smoke test, not a performance claim)" if reporter.env.get("device") == "cpu" else ""
    text = (f"## gazal demo end to end{smoke}\n\n{reporter.env.get('device_name')}, {reporter.env.get('date_utc')} "
            f"UTC; {records[0].get('sft_steps')} SFT + {records[0].get('grpo_steps')} GRPO steps\n\n"
            + common.markdown_table(["status", "wall s", "peak GiB", "SFT loss first", "SFT loss last",
                                     "GRPO acc first 5", "GRPO acc last 10", "learned"], rows))
    path = reporter.write_markdown(text)
    return text + f"\n(written to {path} and {reporter.jsonl})\n"


if __name__ == "__main__":
    main()
