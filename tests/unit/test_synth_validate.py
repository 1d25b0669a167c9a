"""The Chain-of-Draft / structure validator on hand-written answers: ones that pass, and one that
breaks each rule (and only that rule)."""

import pytest

from gazal_nemo.synth.config import ValidationConfig
from gazal_nemo.synth.validate import (
    REASONS,
    check_case,
    check_response,
    count_words,
    reasoning_steps,
)

CFG = ValidationConfig(min_assessment_words=10, max_assessment_words=80, min_case_words=10, max_case_words=60)

STEPS = """\
Review presenting symptoms and vital signs.
Identify key abnormal findings.
Consider differential diagnoses by system.
Evaluate diagnostic test results.
Rule out critical conditions.
Analyze medication interactions.
Prioritize diagnoses by likelihood.
Determine urgent vs. stable concerns."""

ASSESSMENT = """\
## Clinical Assessment
**Primary diagnosis**: inferior STEMI, likely right coronary artery occlusion.
**Plan**: emergent PCI, dual antiplatelet therapy, heparin; echocardiogram after reperfusion."""

GOOD = f"<think>\n{STEPS}\n</think>\n\n{ASSESSMENT}"


def _codes(text, cfg=CFG, **kw):
    return check_response(text, cfg, **kw).codes()


def test_the_b1_example_and_the_model_card_style_pass():
    verdict = check_response(GOOD, CFG)
    assert verdict.passed and verdict.num_steps == 8 and verdict.max_step_words == 6
    assert verdict.assessment_words == count_words(ASSESSMENT)
    numbered = "<think>\n" + "\n".join(f"Step {n}: {line}" for n, line in enumerate(STEPS.splitlines(), 1)) \
        + "\n</think>\n" + ASSESSMENT
    assert check_response(numbered, CFG).passed  # "Step 3:" is formatting, not words
    bullets = "<think>\n" + "\n".join(f"- {line}" for line in STEPS.splitlines()) + "\n\n</think>" + ASSESSMENT
    assert check_response(bullets, CFG).passed  # blank lines are not steps
    assert check_response("  \n" + GOOD, CFG).passed  # leading whitespace is fine


def test_word_and_step_counting():
    assert count_words("Rule out ST-elevation MI -> give aspirin 325 mg q6h.") == 9  # "->" is not a word
    assert reasoning_steps("1. One two\n\n2) Three\n* four five\n- \nStep 10 - six") == \
        ["One two", "Three", "four five", "six"]
    assert reasoning_steps("- 5 mg dose") == ["5 mg dose"]  # a bullet, then a number that is content


@pytest.mark.parametrize("text, code", [
    ("", "empty"),
    ("   \n ", "empty"),
    (f"{STEPS}\n\n{ASSESSMENT}", "no_think_block"),
    (f"<think>\n{STEPS}\n\n{ASSESSMENT}", "no_think_block"),
    (f"</think>{STEPS}<think>\n{ASSESSMENT}", "no_think_block"),
    (f"Let me think.\n{GOOD}", "text_before_think"),
    (f"{GOOD}\n<think>\nMore thoughts.\n</think>", "several_think_blocks"),
    (GOOD.replace("Determine urgent vs. stable concerns.\n", ""), "too_few_steps"),
    (GOOD.replace("Rule out critical conditions.", "Rule out critical conditions like aortic dissection and "
                  "pulmonary embolism first."), "step_too_long"),
    (f"<think>\n{STEPS}\n</think>\n   ", "empty_assessment"),
    (f"<think>\n{STEPS}\n</think>\nInferior STEMI: emergent PCI.", "assessment_too_short"),
    (f"<think>\n{STEPS}\n</think>\n" + "word " * 81, "assessment_too_long"),
    (GOOD + "<|im_end|>", "control_token"),
])
def test_each_rule_fails_alone(text, code):
    assert _codes(text) == [code]
    assert code in REASONS


def test_step_bounds_come_from_the_recipe():
    ten_words = "Consider aortic dissection given tearing pain radiating to the back."
    assert count_words(ten_words) == 10
    text = GOOD.replace("Rule out critical conditions.", ten_words + " now")
    assert _codes(text) == ["step_too_long"]
    assert check_response(text, ValidationConfig(max_words_per_step=11, min_assessment_words=10)).passed
    assert _codes(GOOD, ValidationConfig(min_steps=9, min_assessment_words=10)) == ["too_few_steps"]
    assert _codes(GOOD, ValidationConfig(max_steps=7, min_steps=4, min_assessment_words=10)) == ["too_many_steps"]
    reason = check_response(text, CFG).reasons[0]
    assert reason.startswith("step_too_long: step 5 has 11 words > 10")


def test_truncation_and_failed_requests():
    assert _codes(GOOD, finish_reason="length") == ["truncated"]
    assert check_response(GOOD, ValidationConfig(allow_truncated=True, min_assessment_words=10),
                          finish_reason="length").passed
    assert _codes("", finish_reason="prompt_too_long") == ["prompt_too_long"]
    assert _codes("", finish_reason="failed") == ["request_failed"]


def test_relaxed_validation_keeps_what_can_still_train():
    garbage = check_response("no format at all, just text", CFG)
    assert not garbage.passed and garbage.rejects(enforce=True) and not garbage.rejects(enforce=False)
    for text, reason in (("", "stop"), ("x <|im_start|>user", "stop"), ("", "failed")):
        assert check_response(text, CFG, finish_reason=reason).rejects(enforce=False)


def test_case_checks():
    case = ("A 3-week-old boy is brought in with poor feeding, lethargy and a temperature of 38.4 C. "
            "What is the next step?")
    assert check_case(case, CFG).passed
    assert check_case("Chest pain.", CFG).codes() == ["case_too_short"]
    assert check_case("word " * 61, CFG).codes() == ["case_too_long"]
    assert check_case(case, CFG, finish_reason="length").codes() == ["truncated"]
    assert check_case("", CFG).codes() == ["empty"]
