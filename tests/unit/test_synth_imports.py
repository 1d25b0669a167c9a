"""The synthesis stage stands apart from training and evaluation: no module of gazal_nemo.synth (nor
the command) imports GRPO (rl/, stages/grpo.py) or eval internals, lazily or not; of eval it uses
only `gazal decontam`'s n-gram machinery and the benchmark loader that command uses."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_EVAL = {"gazal_nemo.eval.decontam", "gazal_nemo.eval.loaders"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_synth_imports_no_grpo_and_no_eval_internals():
    files = sorted((ROOT / "gazal_nemo" / "synth").glob("*.py")) + [ROOT / "gazal_nemo" / "commands" / "synth.py"]
    assert len(files) >= 12
    offenders = []
    for path in files:
        for name in _imports(path):
            if name.startswith(("gazal_nemo.rl", "gazal_nemo.stages", "gazal_nemo.tasks")):
                offenders.append((path.name, name))
            if name.startswith("gazal_nemo.eval") and name not in ALLOWED_EVAL:
                offenders.append((path.name, name))
    assert offenders == []


def test_the_checker_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from gazal_nemo.rl.loss import grpo_loss\n")
    assert "gazal_nemo.rl.loss" in _imports(probe)
