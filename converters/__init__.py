"""Stand-alone checkpoint converters (`python -m converters.hf_to_megatron ...`); same code as `gazal convert`."""
