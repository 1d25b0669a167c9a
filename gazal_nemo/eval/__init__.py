"""Evaluation on the paper's Table 2 benchmarks (docs/EVAL.md): loaders -> prompting -> engines
-> run (resumable predictions log) -> scoring -> report; decontam checks training-data overlap."""
