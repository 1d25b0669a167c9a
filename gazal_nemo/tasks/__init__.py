"""Tasks: each one owns its data config, row checks, prompt rendering, answer extraction and
reward, so training (rl/), evaluation (eval/) and data loading import one module per task."""
