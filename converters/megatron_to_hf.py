"""python -m converters.megatron_to_hf --ckpt-dir X --out Y [--overwrite] [--dtype bf16|fp32] [--max-shard-size 5GB]"""

import sys

from gazal_nemo.commands.convert import add_megatron_to_hf_arguments, main_with, run_megatron_to_hf


def main(argv: list[str] | None = None) -> int:
    return main_with(add_megatron_to_hf_arguments, run_megatron_to_hf, "python -m converters.megatron_to_hf", argv)


if __name__ == "__main__":
    sys.exit(main())
