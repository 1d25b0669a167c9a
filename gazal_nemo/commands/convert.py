"""`gazal convert hf-to-megatron | megatron-to-hf`: checkpoint conversion (docs/CONVERTERS.md).

    gazal convert hf-to-megatron --hf-dir Qwen/Qwen3-32B --out ckpt/qwen3-32b --dtype bf16 --tp 8
    gazal convert megatron-to-hf --ckpt-dir runs/sft/final --out out/gazal-r1-hf

Both directions stream tensor by tensor, check every input before writing, and publish the
output folder only when it is complete. `--out` may not be, contain or lie inside an input;
`--overwrite` replaces only a folder that a gazal conversion or export wrote (its
gazal_export.json or gazal_checkpoint.json marker), `--force` any folder. `python -m converters.hf_to_megatron` and
`python -m converters.megatron_to_hf` take the same flags.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (the spelling of transformers' max_shard_size)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"--max-shard-size={text!r}; expected a size like 5GB or 500MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def positive_int(flag: str) -> Callable[[str], int]:
    """An argparse type for `flag` that refuses anything but an integer >= 1, naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={text!r}; expected an integer >= 1") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}={value}; must be >= 1")
        return value

    parse.__name__ = "positive int"
    return parse


def _add_overwrite_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if an earlier gazal conversion or export wrote it (only once complete)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out whatever it holds (implies --overwrite)")


def add_hf_to_megatron_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf-dir", required=True, help="Hugging Face Qwen3 folder, or a hub id like Qwen/Qwen3-32B")
    parser.add_argument("--out", required=True, help="checkpoint folder to create (megatron dist checkpoint + hf/)")
    _add_overwrite_arguments(parser)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="stored dtype (default: the source's)")
    parser.add_argument("--tp", type=positive_int("--tp"), default=1,
                        help="check now that the model splits at this tensor parallelism")
    parser.add_argument("--pp", type=positive_int("--pp"), default=1,
                        help="check now that the model splits at this pipeline depth")
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")


def add_megatron_to_hf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt-dir", required=True,
                        help="checkpoint folder (from hf-to-megatron or training), a training step checkpoint, "
                             "or a folder of step checkpoints (its newest complete one)")
    parser.add_argument("--out", required=True, help="Hugging Face folder to create")
    _add_overwrite_arguments(parser)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="exported dtype (default: stored)")
    parser.add_argument("--hf-meta-dir", default=None,
                        help="config/tokenizer folder for a checkpoint without hf/ (default: <ckpt-dir>/hf)")
    parser.add_argument("--max-shard-size", type=parse_size, default="5GB", help="safetensors shard size (5GB)")
    parser.add_argument("--allow-changes", default="", metavar="PATH[,PATH]",
                        help="base-model files (or recipe keys like model.hf_path) of an adapter step checkpoint that "
                             "may differ from what training recorded (by default a changed base is refused)")
    parser.add_argument("--ignore-extra-keys", action="store_true",
                        help="export the base weights even if the checkpoint holds other tensors (optimizer, adapters)")
    parser.add_argument("--quiet", action="store_true", help="no per-tensor progress lines")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `gazal convert` subcommand: one sub-action per direction."""
    sub = parser.add_subparsers(dest="direction", required=True)
    add_hf_to_megatron_arguments(sub.add_parser(
        "hf-to-megatron", help="HF safetensors -> megatron dist checkpoint (loads at any TP/PP)"))
    add_megatron_to_hf_arguments(sub.add_parser(
        "megatron-to-hf", help="megatron dist checkpoint -> HF safetensors + config + tokenizer"))


def _progress(args):
    return None if args.quiet else (lambda name: print(f"converted {name}", flush=True))


def run_hf_to_megatron(args: argparse.Namespace) -> int:
    from gazal_nemo.convert.hf_to_megatron import convert_hf_to_megatron
    from gazal_nemo.hub import resolve_model_dir

    hf_dir = resolve_model_dir(args.hf_dir, what="--hf-dir")
    out = convert_hf_to_megatron(hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, force=args.force,
                                 tp=args.tp, pp=args.pp, progress=_progress(args))
    print(f"wrote megatron checkpoint {out}")
    return 0


def run_megatron_to_hf(args: argparse.Namespace) -> int:
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf
    from gazal_nemo.convert.step_to_hf import export_step_checkpoint, step_checkpoint_dir

    step_dir = step_checkpoint_dir(args.ckpt_dir)  # a training step checkpoint, or a root of them
    if step_dir is not None:
        from gazal_nemo.convert.dist_ckpt import check_out_apart

        check_out_apart(args.out, {"--ckpt-dir": args.ckpt_dir})  # the root as given, not only its step
        out = export_step_checkpoint(step_dir, args.out, dtype=args.dtype, overwrite=args.overwrite, force=args.force,
                                     allow_changes=tuple(filter(None, args.allow_changes.split(","))))
        print(f"wrote Hugging Face checkpoint {out} from step checkpoint {step_dir}")
        return 0
    out = convert_megatron_to_hf(args.ckpt_dir, args.out, dtype=args.dtype, overwrite=args.overwrite,
                                 hf_meta_dir=args.hf_meta_dir, max_shard_bytes=args.max_shard_size,
                                 ignore_extra_keys=args.ignore_extra_keys, progress=_progress(args), force=args.force)
    print(f"wrote Hugging Face checkpoint {out}")
    return 0


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (scancel, a preempted job) unwinds like Ctrl-C, so the staging folder is removed."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():
        if args.direction == "hf-to-megatron":
            return run_hf_to_megatron(args)
        return run_megatron_to_hf(args)


def main_with(add: Callable[[argparse.ArgumentParser], None], run_fn: Callable[[argparse.Namespace], int],
              prog: str, argv: list[str] | None = None) -> int:
    """Entry point of the `python -m converters.*` scripts: user errors exit 2 with one line."""
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")  # CPU-only noise
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add(parser)
    args = parser.parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return run_fn(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 130
