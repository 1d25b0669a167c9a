"""python -m converters.hf_to_megatron --hf-dir X --out Y [--overwrite] [--dtype bf16|fp32] [--tp N --pp N]"""

import sys

from gazal_nemo.commands.convert import add_hf_to_megatron_arguments, main_with, run_hf_to_megatron


def main(argv: list[str] | None = None) -> int:
    return main_with(add_hf_to_megatron_arguments, run_hf_to_megatron, "python -m converters.hf_to_megatron", argv)


if __name__ == "__main__":
    sys.exit(main())
