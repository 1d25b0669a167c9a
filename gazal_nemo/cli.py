"""`gazal`: the command line. A recipe plus dotted `key=value` overrides, per stage.

    gazal sft  --recipe recipes/sft_qwen3_32b_dora.yaml train.max_steps=10
    gazal grpo --recipe recipes/grpo_qwen3_32b.yaml parallel.tp=4 --dry-run train.max_steps=5
    gazal convert hf-to-megatron --hf-dir Qwen/Qwen3-32B --out ckpt/qwen3-32b
    gazal eval --model out/hf --benchmarks medqa,pubmedqa --data medqa_test.jsonl,ori_pqal.json
    gazal guard --recipe recipes/grpo_qwen3_32b.yaml --logs runs/grpo/logs
    gazal demo

Subcommands import their heavy dependencies only when they run, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron-core warns at import, once per module, that it falls back to torch kernels when
# Apex/TE are absent (every CPU run): the job log should show our progress, not that.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                 "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=f".*{_message}.*")

STAGE_HELP = {
    "sft": "Stage 1: supervised fine-tuning with a DoRA + rsLoRA adapter (paper section 3, Appendix A.1).",
    "grpo": "Stage 2: GRPO on multiple-choice questions with the composite medical reward (section 4, A.2).",
}


def _add_stage(sub, name: str) -> None:
    p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name],
                       epilog="Overrides: dotted keys of the recipe, e.g. train.max_steps=10 parallel.tp=2 "
                              "optim.lr=1e-6. An unknown key is an error.")
    p.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the recipe and the parallel layout for this world size, print it, and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gazal", description="Gazal-R1 recipe on megatron-core: SFT, GRPO, "
                                     "checkpoint conversion and evaluation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_HELP:
        _add_stage(sub, name)
    from gazal_nemo.commands import convert, decontam, demo, evaluate

    convert.add_arguments(sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion",
                                         description="Convert checkpoints between Hugging Face and Megatron."))
    evaluate.add_arguments(sub.add_parser("eval", help="accuracy on MedQA / MedMCQA / PubMedQA / MMLU-Pro files",
                                          description=evaluate.__doc__))
    decontam.add_arguments(sub.add_parser("decontam", help="n-gram overlap of training files with benchmark questions",
                                          description=decontam.__doc__))
    from gazal_nemo.commands import guard, plan, synth

    synth.add_arguments(sub.add_parser("synth", help="generate the paper's structured clinical-reasoning SFT dataset",
                                       description=synth.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    plan.add_arguments(sub.add_parser("plan", help="per-GPU memory plan of a recipe (exit 0 fits, 1 does not)",
                                      description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    guard.add_arguments(sub.add_parser("guard", help="replay a GRPO run's metrics through the collapse guard "
                                       "(would it roll back, how close each rule came)",
                                       description=guard.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    demo.add_arguments(sub.add_parser("demo", help="tiny CPU run of the whole pipeline (no downloads)",
                                      description=demo.__doc__))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """argparse, with overrides allowed on both sides of an option (`a=1 --dry-run b=2`).

    argparse fills a `nargs="*"` positional from one run of arguments only, so overrides after
    an option come back as "unrecognized"; all but unknown options join the overrides (and get
    their checks there: `nonsense` is refused as not key=value, wherever it stands)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "overrides", None) is not None
    unknown = [item for item in extra if not takes_overrides or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command in STAGE_HELP:
            from gazal_nemo.commands.stage import run_stage

            return run_stage(args.command, args.recipe, args.overrides, dry_run=args.dry_run)
        if args.command == "convert":
            from gazal_nemo.commands import convert

            return convert.run(args)
        if args.command == "eval":
            from gazal_nemo.commands import evaluate

            return evaluate.run(args)
        if args.command == "decontam":
            from gazal_nemo.commands import decontam

            return decontam.run(args)
        if args.command == "plan":
            from gazal_nemo.commands import plan

            return plan.run(args)
        if args.command == "synth":
            from gazal_nemo.commands import synth

            return synth.run(args)
        if args.command == "guard":
            from gazal_nemo.commands import guard

            return guard.run(args)
        from gazal_nemo.commands import demo

        return demo.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:  # UnicodeDecodeError is a ValueError
        print(f"gazal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gazal sft --dry-run | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail too
        return 141
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug or the system, keep the traceback
            raise
        print(f"gazal {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gazal {args.command}: error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from gazal_nemo.inference.push_gate import WeightPushError
        from gazal_nemo.rl.guard import TrainingCollapsed

        if isinstance(e, WeightPushError):  # the engine would sample from other weights than it trains
            print(f"gazal {args.command}: error: {e}", file=sys.stderr)
            return 4
        if not isinstance(e, TrainingCollapsed):
            raise
        print(f"gazal {args.command}: error: {e}", file=sys.stderr)  # the guard gave up: a run outcome, not a bug
        return 3


if __name__ == "__main__":
    sys.exit(main())
