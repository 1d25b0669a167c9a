"""The generation prompts and their rendering.

The paper (section 3.1.1) gives each module "its own prompt structure" with confounding
factors "programmatically engineered" into the prompt, but not the prompt text; these
defaults are ours. Two calls make one example:

1. the case writer gets `case_system` and `case_user` (the module, its goal and reasoning
   pattern, the sampled demographics and complexity, one line per confounding factor drawn
   on, and the factor's `otherwise` line when drawn off) and writes a vignette ending in a
   question;
2. the teacher answers that vignette under `response_system`: the SFT system prompt B.1
   followed by the module's reasoning pattern and the Chain-of-Draft bounds.

The SFT example keeps B.1 alone as its system prompt, so the trained model learns to reason
this way from B.1, without the generation-time instructions. Templates are Python format
strings: placeholders in braces, literal braces doubled; an unknown placeholder is refused
when the recipe is loaded.
"""

from __future__ import annotations

import string

CASE_SYSTEM_PROMPT = (
    "You are an experienced attending physician and medical educator. You write realistic, "
    "challenging clinical cases that test expert clinical reasoning. You never reveal the answer in the case."
)

CASE_USER_TEMPLATE = """\
Write one clinical case for training {module_title}.
Goal of this case type: {module_goal}.
The reasoning it must call for: {reasoning_pattern}.

Patient: {age_group}, {sex}.
Case complexity: {complexity}.
Build these features into the case:
{case_features}

Write the case as a clinical vignette (presenting complaint, history, examination, and the test results \
available so far) of 120 to 300 words. End with one open question that the reader must answer by reasoning \
through the case. Do not answer the question, name the diagnosis or give hints. Return only the case and \
its question."""

RESPONSE_SYSTEM_TEMPLATE = """\
{sft_system_prompt}

For this case, reason in this order: {reasoning_pattern}.
Write at least {min_steps} reasoning steps inside <think></think>, one step per line, each step at most \
{max_words_per_step} words. After </think>, write the complete assessment in Markdown."""

# Placeholders each template may use (the categorical attributes of the recipe join CASE's).
CASE_FIELDS = ("module", "module_title", "module_goal", "reasoning_pattern", "case_features", "min_steps",
               "max_words_per_step")
RESPONSE_FIELDS = ("module", "module_title", "reasoning_pattern", "min_steps", "max_words_per_step",
                   "sft_system_prompt")


def template_fields(template: str, key: str) -> set[str]:
    """Placeholder names of a format template; ValueError naming `key` when it does not parse."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{key}: not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    names = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{key}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain name like {{module_title}}")
        names.add(name)
    return names


def check_template(template: str, key: str, allowed: set[str]) -> None:
    unknown = sorted(template_fields(template, key) - allowed)
    if unknown:
        raise ValueError(f"{key}: unknown placeholder {{{unknown[0]}}}; allowed: "
                         + ", ".join(f"{{{name}}}" for name in sorted(allowed)))


def case_messages(recipe, attrs) -> list[dict]:
    """The case writer's conversation for one example's attributes."""
    design, prompts = recipe.design, recipe.prompts
    module = design.modules[attrs.module]
    lines = []
    for name, factor in module.factors.items():
        text = factor.instruction if attrs.module_factors[name] else factor.otherwise
        if text:
            lines.append(f"- {text}")
    for name, factor in design.factors.items():
        text = factor.instruction if attrs.factors[name] else factor.otherwise
        if text:
            lines.append(f"- {text}")
    values = dict(_common_fields(recipe, attrs.module), case_features="\n".join(lines) or "- (none)")
    for name, choice in attrs.categorical.items():
        values[name] = design.categorical[name].describe(choice)
    return [{"role": "system", "content": prompts.case_system},
            {"role": "user", "content": prompts.case_user.format(**values)}]


def response_messages(recipe, attrs, case_text: str) -> list[dict]:
    """The teacher's conversation: B.1 plus the module's pattern, then the case."""
    system = recipe.prompts.response_system.format(**_common_fields(recipe, attrs.module),
                                                   sft_system_prompt=recipe.prompts.sft_system_prompt)
    return [{"role": "system", "content": system}, {"role": "user", "content": case_text}]


def sft_messages(recipe, case_text: str, response_text: str) -> list[dict]:
    """The training example: B.1, the case, the answer (what `gazal sft` reads as format `messages`)."""
    return [{"role": "system", "content": recipe.prompts.sft_system_prompt},
            {"role": "user", "content": case_text},
            {"role": "assistant", "content": response_text}]


def _common_fields(recipe, module_name: str) -> dict:
    module = recipe.design.modules[module_name]
    return {"module": module_name, "module_title": module.title, "module_goal": module.goal,
            "reasoning_pattern": " -> ".join(module.reasoning_pattern),
            "min_steps": recipe.validation.min_steps, "max_words_per_step": recipe.validation.max_words_per_step}
