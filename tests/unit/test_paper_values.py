"""Every hyperparameter of the paper's Tables 3 (SFT) and 4 (GRPO), both system prompts and the
reward constants it states, checked against the 32B recipes.

Each row: the paper's parameter and value as printed, then how our recipe expresses it: a
check on the loaded recipe, or an explicit, commented exception for the known deviations
(packed sequences vs examples, gradient accumulation as a derived quantity, the ambiguous
epsilon). A recipe edit that drifts from the paper fails here with the row named.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gazal_nemo.data.prompts import GRPO_SYSTEM_PROMPT, SFT_SYSTEM_PROMPT
from gazal_nemo.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
SEEDS = next((p for p in (ROOT.parent / "shared" / "seeds", Path("/work/shared/seeds")) if p.is_dir()), None)
PAPER = SEEDS / "000_ff4b775be55dfd7d.txt" if SEEDS else None

SFT = load_recipe(ROOT / "recipes" / "sft_qwen3_32b_dora.yaml")
GRPO = load_recipe(ROOT / "recipes" / "grpo_qwen3_32b.yaml")
GRPO_PER_STEP = GRPO.grpo.prompts_per_step * GRPO.grpo.sampling.num_generations


def _exception(reason: str):
    """A documented deviation: the row holds no check, only why (and it must say something)."""
    assert len(reason) > 40
    return None


# (parameter as printed in Table 3, value as printed, check on our SFT recipe)
TABLE_3 = [
    ("Base Model", "Qwen 3 32B", lambda r: r.model.hf_path == "Qwen/Qwen3-32B"),
    ("Fine-tuning Method", "DoRA + rsLoRA", lambda r: r.adapter.use_dora and r.adapter.use_rslora),
    ("LoRA Rank (r)", "256", lambda r: r.adapter.rank == 256),
    ("LoRA Alpha (α)", "512", lambda r: r.adapter.alpha == 512),
    ("LoRA Dropout", "0.1", lambda r: r.adapter.dropout == 0.1),
    ("Target Modules", "all-linear",
     # megatron's fused names: qkv holds q, k, v; fc1 holds gate and up; each projection its own A/B
     lambda r: set(r.adapter.targets) == {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"}),
    ("Optimizer", "EXAdam", lambda r: r.optim.name == "exadam"),
    ("Learning Rate", "2e-5", lambda r: r.optim.lr == 2e-5),
    ("LR Scheduler", "Cosine Schedule", lambda r: r.optim.schedule == "cosine"),
    ("Warmup Ratio", "0.05", lambda r: r.optim.warmup_ratio == 0.05),
    ("Weight Decay", "0.1", lambda r: r.optim.weight_decay == 0.1),
    ("Epochs", "1", lambda r: r.train.epochs == 1 and r.train.max_steps is None),
    ("Batch Size per GPU", "8", lambda r: _exception(
        "we pack examples into 8192-token sequences and run one packed sequence per forward "
        "(train.micro_batch_size=1): a micro-batch holds several examples, so 'per GPU' counts differ")),
    ("Gradient Accumulation Steps", "16", lambda r: _exception(
        "derived, not set: megatron accumulates global_batch_size / (micro_batch_size x data-parallel) "
        "micro-batches per step")),
    ("Effective Batch Size", "128", lambda r: r.train.global_batch_size == 128),  # packed sequences: see the recipe
    ("Max Sequence Length", "8192", lambda r: r.train.seq_length == 8192 and r.sft_data.max_length == 8192),
    ("Precision", "bfloat16", lambda r: r.precision.dtype == "bf16"),
    ("Gradient Checkpointing", "True", lambda r: r.train.recompute != "none"),
    ("Seed", "3407", lambda r: r.train.seed == 3407 and r.sft_data.seed == 3407),
]

TABLE_4 = [
    ("Base Model", "Gazal-R1 (SFT-tuned)", lambda r: r.model.hf_path.endswith("sft_qwen3_32b/export/merged")),
    ("RL Algorithm", "GRPO with BNPO loss",
     lambda r: r.grpo.loss.normalisation == "bnpo" and r.grpo.loss.mask_truncated),
    ("Optimizer", "EXAdam", lambda r: r.optim.name == "exadam"),
    ("Learning Rate", "1.0e-6", lambda r: r.optim.lr == 1e-6),
    ("LR Scheduler", "Constant with Warmup", lambda r: r.optim.schedule == "constant"),
    ("Warmup Ratio", "0.0", lambda r: r.optim.warmup_ratio == 0.0),
    ("Weight Decay", "0.1", lambda r: r.optim.weight_decay == 0.1),
    ("Epochs", "1", lambda r: r.train.epochs == 1 and r.train.max_steps is None),
    ("Batch Size per GPU", "4", lambda r: _exception(
        "TRL's per-device completion count is a memory-layout choice here (train.micro_batch_size); "
        "the step's batch is prompts_per_step x num_generations completions, checked below")),
    ("Gradient Accumulation Steps", "8", lambda r: _exception(
        "derived: global_batch_size / (micro_batch_size x data-parallel); 4 x 8 GPUs x 8 = 256 in TRL would be "
        "64 prompts, which the table's 32 contradicts (see docs/GRPO.md)")),
    ("Generations per Prompt (K)", "4", lambda r: r.grpo.sampling.num_generations == 4),
    ("Effective Prompts per Step", "32",
     lambda r: r.grpo.prompts_per_step == 32 and r.train.global_batch_size == GRPO_PER_STEP),
    ("GRPO Beta (β)", "0.0", lambda r: r.grpo.loss.beta == 0.0),
    # Ambiguous: in TRL one epsilon sets both bounds; the text (4.3.1) raises only the upper one.
    ("GRPO Epsilon (ϵ)", "0.28", lambda r: r.grpo.loss.eps_high == 0.28 and r.grpo.loss.eps_low == 0.2),
    ("Generation Temperature", "0.6", lambda r: r.grpo.sampling.temperature == 0.6),
    ("Top-k / Top-p", "20 / 0.95", lambda r: (r.grpo.sampling.top_k, r.grpo.sampling.top_p) == (20, 0.95)),
    ("Max Prompt Length", "3072", lambda r: r.grpo.data.max_prompt_length == 3072),
    ("Max Completion Length", "4096",
     lambda r: r.grpo.sampling.max_new_tokens == 4096 and r.grpo.rewards.cosine_max_length == 4096
     and r.train.seq_length >= 3072 + 4096),
    ("Precision", "bfloat16", lambda r: r.precision.dtype == "bf16"),
    ("Seed", "3047", lambda r: r.train.seed == 3047 and r.grpo.data.seed == 3047),
]

# What the paper says of the rewards (section 4.4, Table 1) and of training (4.5), beyond Table 4.
PAPER_TEXT_CHECKS = [
    ("accuracy: +1.0 for correct, 0 otherwise", lambda r: r.grpo.rewards.accuracy_weight == 1.0),
    ("composite reward: accuracy, format, cosine length, repetition",
     lambda r: all(w > 0 for w in (r.grpo.rewards.format_weight, r.grpo.rewards.cosine_weight,
                                   r.grpo.rewards.repetition_weight))),
    ("repetition penalty on 3-grams", lambda r: r.grpo.rewards.repetition_ngram_size == 3),
    ("cosine: correct falls, wrong rises with length (Yeo et al. r0c=2, rLc=1, r0w=-10, rLw=0)",
     lambda r: (r.grpo.rewards.cosine_max_correct, r.grpo.rewards.cosine_min_correct,
                r.grpo.rewards.cosine_min_wrong, r.grpo.rewards.cosine_max_wrong) == (2.0, 1.0, -10.0, 0.0)),
    ("masking of truncated completions (4.5.1)", lambda r: r.grpo.loss.mask_truncated),
    ("one update per batch (no reuse mentioned)", lambda r: r.grpo.num_iterations == 1
     and r.grpo.steps_per_generation == 1 and not r.grpo.dynamic_sampling.enabled),
    ("the hub set is already the 10% UltraMedical subset (32K MCQs, model card)",
     lambda r: r.grpo.data.path == "TachyHealth/medical_grpo" and r.grpo.data.subset_fraction == 1.0),
    ("system prompt B.2", lambda r: r.grpo.data.system_prompt in (None, GRPO_SYSTEM_PROMPT)),
]


def test_the_tables_have_every_row_of_the_paper():
    assert len(TABLE_3) == 19 and len(TABLE_4) == 20


@pytest.mark.parametrize("row", TABLE_3, ids=[r[0] for r in TABLE_3])
def test_sft_recipe_matches_table_3(row):
    name, value, check = row
    assert check(SFT) is not False, f"Table 3 '{name}' = {value}: recipes/sft_qwen3_32b_dora.yaml disagrees"


@pytest.mark.parametrize("row", TABLE_4, ids=[r[0] for r in TABLE_4])
def test_grpo_recipe_matches_table_4(row):
    name, value, check = row
    assert check(GRPO) is not False, f"Table 4 '{name}' = {value}: recipes/grpo_qwen3_32b.yaml disagrees"


@pytest.mark.parametrize("row", PAPER_TEXT_CHECKS, ids=[r[0][:40] for r in PAPER_TEXT_CHECKS])
def test_grpo_recipe_matches_the_papers_text(row):
    what, check = row
    assert check(GRPO), what


def test_sft_uses_the_b1_prompt_and_decays_as_the_papers_trainer():
    assert SFT.sft_data.system_prompt in (None, SFT_SYSTEM_PROMPT)
    # HF's Trainer decays every parameter but biases and norms, DoRA's magnitude vectors included.
    assert SFT.optim.decay_dora_magnitude


@pytest.mark.skipif(PAPER is None or not PAPER.is_file(), reason="paper text not beside the checkout")
def test_our_tables_are_the_papers_tables():
    """The values above are the printed ones: read Tables 3 and 4 back from the paper's text."""
    text = PAPER.read_text()
    for table, title in ((TABLE_3, "Table 3: Detailed SFT Hyperparameters"),
                         (TABLE_4, "Table 4: Detailed GRPO Hyperparameters")):
        block = text[text.index(title):].split("\n\n", 2)[1]
        printed = dict(line.split("\t", 1) for line in block.splitlines()[1:] if "\t" in line)
        assert {name: value for name, value, _ in table} == printed, title


@pytest.mark.skipif(PAPER is None or not PAPER.is_file(), reason="paper text not beside the checkout")
def test_both_system_prompts_are_verbatim():
    text = re.sub(r"\s+", " ", PAPER.read_text())
    for prompt in (SFT_SYSTEM_PROMPT, GRPO_SYSTEM_PROMPT):
        assert re.sub(r"\s+", " ", prompt) in text
