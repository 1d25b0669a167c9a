"""Attribute sampling of `gazal synth` against the paper's rates (section 3.1.1), without generation.

The paper's numbers are typed here from the paper, not read from our code, so a changed
default or recipe fails. Over 10,000 draws every rate must land in the central binomial
interval of its target (module factors among the cases of their module). The intervals are
99% for the 34 rates together (Bonferroni, as the run report uses them): at 99% each, a
correct sampler fails one of 34 checks for ~29% of seeds (the recipe's seed 3407 puts
ethical_dilemma at 1271/2549 = 49.9% against 47%, 2.9 sigma, which 200,000 draws show is
chance: 47.02%). A sampler off by 3 points fails the check, so the check can fail.
"""

import dataclasses
from pathlib import Path

import pytest

from gazal_nemo.synth.attributes import draw_attributes, tally, uniform
from gazal_nemo.synth.config import DesignConfig, load_synth_recipe
from gazal_nemo.synth.report import per_rate_level
from gazal_nemo.synth.stats import binomial_interval, wilson_interval

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "synth_structured_medical.yaml"
NUM_DRAWS = 10_000

PAPER_MODULE_FACTORS = {
    "diagnostic_reasoning": {"atypical_presentation": 0.70, "subtle_red_flags": 0.65, "rare_condition": 0.60},
    "decision_making_under_uncertainty": {"critically_incomplete_information": 0.86, "conflicting_clinical_data": 0.65,
                                          "time_pressure": 0.60, "ethical_dilemma": 0.47},
    "treatment_planning": {"drug_interactions": 0.70, "contraindications": 0.65, "patient_preferences": 0.60,
                           "medication_costs": 0.50},
    "prognostic_assessment": {"multimorbidity": 0.75, "high_risk_factors": 0.65, "limited_prognostic_evidence": 0.55},
}
PAPER_PATTERNS = {
    "diagnostic_reasoning": ["Symptom analysis", "Physical findings assessment", "Test interpretation",
                             "Differential narrowing"],
    "decision_making_under_uncertainty": ["Identify available data", "Note missing information",
                                          "Assess immediate risk", "Consider possibilities", "Prioritize urgency",
                                          "Weigh risk-benefit tradeoffs"],
    "treatment_planning": ["Diagnosis confirmation", "Guideline review", "Patient factors assessment",
                           "Therapy selection"],
    "prognostic_assessment": ["Condition severity assessment", "Risk factors evaluation",
                              "Evidence-based outcomes review", "Personalized prediction"],
}
PAPER_CROSS_CUTTING = {"comorbidities": 0.85, "social_determinants": 0.60, "ethnic_genetic": 0.40}


@pytest.fixture(scope="module")
def recipe():
    return load_synth_recipe(RECIPE)


@pytest.fixture(scope="module")
def draws(recipe):
    return [draw_attributes(recipe.design, recipe.seed, i).to_json() for i in range(NUM_DRAWS)]


def test_the_recipe_and_the_defaults_are_the_papers_design(recipe):
    for design in (recipe.design, DesignConfig()):
        assert {m: {f: x.rate for f, x in module.factors.items()} for m, module in design.modules.items()} \
            == PAPER_MODULE_FACTORS
        assert {m: module.reasoning_pattern for m, module in design.modules.items()} == PAPER_PATTERNS
        assert {name: f.rate for name, f in design.factors.items()} == PAPER_CROSS_CUTTING
        assert design.categorical["complexity"].weights["high"] == 0.70
        ages = design.categorical["age_group"].weights
        # newborns and the very elderly over-represented against their ~1% and ~4% of a population
        assert ages["newborn"] >= 0.10 and ages["very_elderly"] >= 0.15
    assert dataclasses.asdict(recipe.design) == dataclasses.asdict(DesignConfig())
    assert recipe.validation.min_steps == 8 and recipe.validation.max_words_per_step == 10
    assert recipe.num_examples == 107_033


def _outside(design, draws) -> list[str]:
    bad = []
    rows = tally(design, draws)
    for row in rows:
        lo, hi = binomial_interval(row["num_cases"], row["target"], per_rate_level(len(rows)))
        if not lo <= row["num_with"] <= hi:
            bad.append(f"{row['key']}: {row['num_with']}/{row['num_cases']} outside [{lo}, {hi}]")
    return bad


def test_every_rate_is_in_its_99pct_binomial_interval_over_10000_draws(recipe, draws):
    rows = tally(recipe.design, draws)
    assert len(rows) == 4 + 3 + 8 + 2 + 14 + 3  # every module, category and factor is checked
    assert all(row["num_cases"] > 2000 for row in rows if row["module"])  # ~2,500 cases per module
    assert _outside(recipe.design, draws) == []


def test_a_sampler_three_points_off_fails_the_check(recipe):
    wrong = load_synth_recipe(RECIPE, ["design.categorical.complexity.weights.high=0.67",
                                       "design.categorical.complexity.weights.moderate=0.23"]).design
    shifted = [draw_attributes(wrong, recipe.seed, i).to_json() for i in range(NUM_DRAWS)]
    outside = _outside(recipe.design, shifted)
    assert [line.split(":")[0] for line in outside] == ["complexity=high", "complexity=moderate"], outside


def test_factors_are_drawn_independently(recipe, draws):
    both = sum(d["factors"]["comorbidities"] and d["factors"]["social_determinants"] for d in draws)
    lo, hi = binomial_interval(NUM_DRAWS, 0.85 * 0.60, 0.99)
    assert lo <= both <= hi
    diagnostic = [d for d in draws if d["module"] == "diagnostic_reasoning"]
    joint = sum(d["module_factors"]["atypical_presentation"] and d["module_factors"]["rare_condition"]
                for d in diagnostic)
    lo, hi = binomial_interval(len(diagnostic), 0.70 * 0.60, 0.99)
    assert lo <= joint <= hi
    assert all(set(d["module_factors"]) == set(PAPER_MODULE_FACTORS[d["module"]]) for d in draws[:200])


def test_an_example_draws_the_same_whatever_the_order_and_other_factors(recipe):
    forward = [draw_attributes(recipe.design, recipe.seed, i) for i in range(50)]
    backward = [draw_attributes(recipe.design, recipe.seed, i) for i in reversed(range(50))][::-1]
    assert forward == backward
    extended = load_synth_recipe(RECIPE).design
    from gazal_nemo.synth.config import FactorConfig

    extended.factors["pregnancy"] = FactorConfig(rate=0.1, instruction="The patient is pregnant.")
    for before, index in zip(forward, range(50)):
        after = draw_attributes(extended, recipe.seed, index)
        assert after.module == before.module and after.categorical == before.categorical
        assert after.module_factors == before.module_factors
        assert {k: v for k, v in after.factors.items() if k != "pregnancy"} == before.factors
    other_seed = [draw_attributes(recipe.design, recipe.seed + 1, i) for i in range(50)]
    assert other_seed != forward


def test_uniform_draws_are_uniform():
    values = [uniform(0, i, "x") for i in range(20_000)]
    assert 0.0 <= min(values) and max(values) < 1.0
    for edge in (0.1, 0.5, 0.9):
        lo, hi = binomial_interval(len(values), edge, 0.999)
        assert lo <= sum(v < edge for v in values) <= hi


def test_binomial_and_wilson_intervals_against_hand_computations():
    # Bin(10, 0.5): P(X <= 0) = 1/1024 <= 0.005 < P(X <= 1) = 11/1024, so the 99% interval is [1, 9]
    assert binomial_interval(10, 0.5, 0.99) == (1, 9)
    # Bin(20, 0.1): P(X = 0) = 0.1216 > 0.005, so lo = 0; P(X >= 7) = 0.00239 <= 0.005 < P(X >= 6) = 0.0113
    assert binomial_interval(20, 0.1, 0.99) == (0, 6)
    assert binomial_interval(5, 0.0) == (0, 0) and binomial_interval(5, 1.0) == (5, 5)
    lo, hi = wilson_interval(50, 100, 0.95)  # textbook value: [0.4038, 0.5962]
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    lo, hi = wilson_interval(0, 10, 0.95)  # [0, 0.2775]
    assert abs(lo) < 1e-12 and abs(hi - 0.2775) < 1e-4
