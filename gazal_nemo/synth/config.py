"""The synthesis recipe (`gazal synth --recipe R [key=value ...]`): its schema and its loader.

Its own schema, not a stage of gazal_nemo/recipe.py, loaded with config_io's machinery, so an
unknown key, a wrong type, a key given twice or a bad override is refused as for the stages.
The defaults are the paper's design (section 3.1.1): four modules with their reasoning
patterns and confounding-factor rates, 70% "high" complexity, over-represented newborns and
very elderly, the cross-cutting factors, the Chain-of-Draft bounds (>= 8 steps of <= 10
words). Modules, factors, rates and weights are data: a module or a specialty is a few lines
of YAML. Where the paper gives no number we say which we chose (module weights equal;
complexity moderate 20% / low 10%; the age-group weights below).

The design sections are dictionaries with free names (a module, a factor, a category), so
`config_io` cannot tell a misspelt name from a new one; `load_synth_recipe` fills in the
default design first and refuses an override that names a module, factor or category the
recipe does not have ("unknown module key ..."), before anything is generated.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from gazal_nemo.config_io import apply_overrides, from_dict, load_yaml, parse_override, to_dict
from gazal_nemo.data.prompts import SFT_SYSTEM_PROMPT
from gazal_nemo.synth.prompts import (
    CASE_FIELDS,
    CASE_SYSTEM_PROMPT,
    CASE_USER_TEMPLATE,
    RESPONSE_FIELDS,
    RESPONSE_SYSTEM_TEMPLATE,
    check_template,
)

WEIGHT_TOLERANCE = 1e-6
"""Weights of one choice must sum to 1 within this."""


def _check_rate(value: float, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value}; allowed: a rate in [0, 1]")


def _check_weights(weights: dict[str, float], key: str) -> None:
    if not weights:
        raise ValueError(f"{key}: empty; allowed: at least one choice with a weight")
    for name, weight in weights.items():
        if not weight >= 0:
            raise ValueError(f"{key}.{name}={weight}; allowed: weights >= 0 that sum to 1")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"{key}: weights sum to {total:.6g}, not 1 ({', '.join(f'{k}={v:g}' for k, v in weights.items())})")


@dataclass(kw_only=True)
class FactorConfig:
    """A confounding factor, drawn on or off for each case independently."""

    rate: float
    """Share of cases that get it (the paper's percentages, as fractions)."""
    instruction: str
    """Line added to the case prompt when the factor is drawn on."""
    otherwise: str = ""
    """Line added when it is drawn off ("" adds none)."""

    KEY_PREFIX: ClassVar[str] = "factor"

    def __post_init__(self):
        _check_rate(self.rate, f"{self.KEY_PREFIX}.rate")
        if not self.instruction.strip():
            raise ValueError(f"{self.KEY_PREFIX}.instruction: empty; write the line the case prompt gets")


@dataclass(kw_only=True)
class CategoricalConfig:
    """An attribute with one value per case, drawn by weight (complexity, age group, sex, a specialty)."""

    weights: dict[str, float]
    """Value -> share of cases; must sum to 1."""
    text: dict[str, str] = field(default_factory=dict)
    """Value -> how the case prompt says it (unlisted values: the name with '_' as spaces)."""

    KEY_PREFIX: ClassVar[str] = "categorical"

    def __post_init__(self):
        _check_weights(self.weights, f"{self.KEY_PREFIX}.weights")
        unknown = sorted(set(self.text) - set(self.weights))
        if unknown:
            raise ValueError(f"{self.KEY_PREFIX}.text.{unknown[0]}: not a value of {self.KEY_PREFIX}.weights "
                             f"({', '.join(self.weights)})")

    def describe(self, value: str) -> str:
        return self.text.get(value, value.replace("_", " "))


@dataclass(kw_only=True)
class ModuleConfig:
    """One type of clinical reasoning: its share, its prompt parts and its confounding factors."""

    weight: float
    """Share of cases of this module (the paper gives none; equal shares by default)."""
    title: str
    """Name in the prompts ("diagnostic reasoning")."""
    goal: str
    """What the case trains, in the paper's words."""
    reasoning_pattern: list[str]
    """The enforced order of reasoning stages (the paper's arrows)."""
    factors: dict[str, FactorConfig] = field(default_factory=dict)
    """The module's confounding factors by name."""

    KEY_PREFIX: ClassVar[str] = "module"

    def __post_init__(self):
        if not self.weight >= 0:
            raise ValueError(f"{self.KEY_PREFIX}.weight={self.weight}; allowed: >= 0, all module weights summing to 1")
        if not self.reasoning_pattern or not all(isinstance(s, str) and s.strip() for s in self.reasoning_pattern):
            raise ValueError(f"{self.KEY_PREFIX}.reasoning_pattern: give the reasoning stages, in order")
        if not self.title.strip() or not self.goal.strip():
            raise ValueError(f"{self.KEY_PREFIX}.title and .goal: must not be empty")


def _factor(rate: float, instruction: str, otherwise: str = "") -> FactorConfig:
    return FactorConfig(rate=rate, instruction=instruction, otherwise=otherwise)


def paper_modules() -> dict[str, ModuleConfig]:
    """The four modules of section 3.1.1 with the paper's patterns and factor rates."""
    return {
        "diagnostic_reasoning": ModuleConfig(
            weight=0.25, title="diagnostic reasoning",
            goal="systematically synthesize symptoms, lab results and patient history into an accurate "
                 "differential diagnosis",
            reasoning_pattern=["Symptom analysis", "Physical findings assessment", "Test interpretation",
                               "Differential narrowing"],
            factors={
                "atypical_presentation": _factor(0.70, "The condition presents atypically.",
                                                 "The condition presents in its usual way."),
                "subtle_red_flags": _factor(0.65, "Include subtle red-flag symptoms or signs that are easy to miss."),
                "rare_condition": _factor(0.60, "The underlying condition is rare.",
                                          "The underlying condition is common."),
            }),
        "decision_making_under_uncertainty": ModuleConfig(
            weight=0.25, title="decision-making under uncertainty",
            goal="choose the optimal action when information is incomplete or conflicting, with a prudent, "
                 "risk-aware approach",
            reasoning_pattern=["Identify available data", "Note missing information", "Assess immediate risk",
                               "Consider possibilities", "Prioritize urgency", "Weigh risk-benefit tradeoffs"],
            factors={
                "critically_incomplete_information": _factor(
                    0.86, "Information critical to the decision is missing or cannot be obtained in time."),
                "conflicting_clinical_data": _factor(0.65, "Some of the clinical data conflict with each other."),
                "time_pressure": _factor(0.60, "The decision must be made under time pressure."),
                "ethical_dilemma": _factor(0.47, "The decision involves an ethical dilemma."),
            }),
        "treatment_planning": ModuleConfig(
            weight=0.25, title="treatment planning",
            goal="build a structured, evidence-based treatment plan that accounts for patient-specific variables",
            reasoning_pattern=["Diagnosis confirmation", "Guideline review", "Patient factors assessment",
                               "Therapy selection"],
            factors={
                "drug_interactions": _factor(0.70, "The patient's current medications create potential drug "
                                                   "interactions."),
                "contraindications": _factor(0.65, "The patient has contraindications to the most common therapies."),
                "patient_preferences": _factor(0.60, "The patient's (or family's) preferences shape the choice of "
                                                     "therapy."),
                "medication_costs": _factor(0.50, "Medication cost or access limits the options."),
            }),
        "prognostic_assessment": ModuleConfig(
            weight=0.25, title="prognostic assessment",
            goal="estimate the patient's outcome by integrating multidimensional clinical evidence and communicate "
                 "the uncertainty",
            reasoning_pattern=["Condition severity assessment", "Risk factors evaluation",
                               "Evidence-based outcomes review", "Personalized prediction"],
            factors={
                "multimorbidity": _factor(0.75, "The patient has several chronic conditions that interact."),
                "high_risk_factors": _factor(0.65, "The patient has high-risk factors for a poor outcome."),
                "limited_prognostic_evidence": _factor(0.55, "Evidence on the prognosis of this situation is limited."),
            }),
    }


def paper_categorical() -> dict[str, CategoricalConfig]:
    """Complexity (70% high, as in the paper), age group (newborns and the very elderly
    over-represented: 10% and 15% of cases against ~1% and ~4% of a population) and sex."""
    return {
        "complexity": CategoricalConfig(
            weights={"high": 0.70, "moderate": 0.20, "low": 0.10},
            text={"high": "high (several interacting problems and competing priorities)",
                  "moderate": "moderate (one main problem with a complicating factor)",
                  "low": "low (one main problem, clearly presented)"}),
        "age_group": CategoricalConfig(
            weights={"newborn": 0.10, "infant": 0.05, "child": 0.10, "adolescent": 0.07, "young_adult": 0.16,
                     "middle_aged_adult": 0.20, "older_adult": 0.17, "very_elderly": 0.15},
            text={"newborn": "a newborn (0-28 days old)", "infant": "an infant (1-11 months old)",
                  "child": "a child (1-11 years old)", "adolescent": "an adolescent (12-17 years old)",
                  "young_adult": "a young adult (18-39 years old)",
                  "middle_aged_adult": "a middle-aged adult (40-64 years old)",
                  "older_adult": "an older adult (65-79 years old)",
                  "very_elderly": "a very elderly patient (80 years or older)"}),
        "sex": CategoricalConfig(weights={"female": 0.5, "male": 0.5}),
    }


def paper_cross_cutting() -> dict[str, FactorConfig]:
    """Diversity factors of every module, at the paper's rates."""
    return {
        "comorbidities": _factor(0.85, "The patient has relevant comorbidities."),
        "social_determinants": _factor(0.60, "Social determinants of health (housing, income, access to care, "
                                             "support) affect the case."),
        "ethnic_genetic": _factor(0.40, "Relevant ethnic or genetic considerations affect risk, diagnosis or "
                                        "treatment."),
    }


@dataclass(kw_only=True)
class DesignConfig:
    """What each case is about: modules, categorical attributes and cross-cutting factors."""

    modules: dict[str, ModuleConfig] = field(default_factory=paper_modules)
    """Reasoning modules by name; their weights sum to 1."""
    categorical: dict[str, CategoricalConfig] = field(default_factory=paper_categorical)
    """One-value-per-case attributes; each name is a placeholder of prompts.case_user."""
    factors: dict[str, FactorConfig] = field(default_factory=paper_cross_cutting)
    """Cross-cutting factors, drawn for every case whatever its module."""

    def __post_init__(self):
        if not self.modules:
            raise ValueError("design.modules: empty; allowed: at least one module")
        _check_weights({name: m.weight for name, m in self.modules.items()}, "design.modules.*.weight")
        reserved = set(CASE_FIELDS) & set(self.categorical)
        if reserved:
            raise ValueError(f"design.categorical.{sorted(reserved)[0]}: the name is taken by a prompt placeholder; "
                             f"reserved: {', '.join(CASE_FIELDS)}")
        for name in self.categorical:
            if not name.isidentifier():
                raise ValueError(f"design.categorical.{name}: names must be identifiers (they are placeholders)")


@dataclass(kw_only=True)
class PromptsConfig:
    """The prompt templates (gazal_nemo/synth/prompts.py says how they are used)."""

    case_system: str = CASE_SYSTEM_PROMPT
    """System prompt of the case writer."""
    case_user: str = CASE_USER_TEMPLATE
    """Case request; placeholders: the CASE_FIELDS of prompts.py and every design.categorical name."""
    response_system: str = RESPONSE_SYSTEM_TEMPLATE
    """System prompt of the answer's generation: B.1 plus the module's pattern and the CoD bounds."""
    sft_system_prompt: str = SFT_SYSTEM_PROMPT
    """System prompt of the kept SFT example (Appendix B.1, verbatim)."""


@dataclass(kw_only=True)
class SamplingConfig:
    """How one of the two calls samples (defaults: Gemma 3's recommended decoding)."""

    max_new_tokens: int
    """Completion budget in tokens."""
    temperature: float = 1.0
    top_k: int = 64
    """0 disables."""
    top_p: float = 0.95

    KEY_PREFIX: ClassVar[str] = "sampling"

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"{self.KEY_PREFIX}.max_new_tokens={self.max_new_tokens}; allowed: integers >= 1")
        for name, ok, allowed in (("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                                  ("top_p", 0 < self.top_p <= 1, "0 < top_p <= 1")):
            if not ok:
                raise ValueError(f"{self.KEY_PREFIX}.{name}={getattr(self, name)}; allowed: {allowed}")


@dataclass(kw_only=True)
class VLLMBackendConfig:
    """The offline vLLM engine (backend vllm)."""

    gpu_memory_utilization: float = 0.90
    """Share of each GPU vLLM may take (it is alone on its GPUs here)."""
    max_num_seqs: int = 256
    """Sequences scheduled at once."""
    cpu_kv_cache_gib: int = 1
    """CPU only: GiB of host memory for the KV cache (vLLM reads a whole number)."""

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"generator.vllm.gpu_memory_utilization={self.gpu_memory_utilization}; allowed: (0, 1]")
        if self.max_num_seqs < 1 or self.cpu_kv_cache_gib < 1:
            raise ValueError("generator.vllm.max_num_seqs and generator.vllm.cpu_kv_cache_gib must be >= 1")


@dataclass(kw_only=True)
class OpenAIBackendConfig:
    """Any OpenAI-compatible chat endpoint (backend openai): vLLM's server, NIM, a hosted API."""

    base_url: str = "http://127.0.0.1:8000/v1"
    """Endpoint root; requests go to {base_url}/chat/completions."""
    api_key_env: str = ""
    """Name of the environment variable holding the API key ("" sends none); the key never sits in a recipe."""
    max_concurrency: int = 32
    """Requests in flight at once."""
    requests_per_second: float = 0.0
    """Start at most this many requests a second (0: no limit)."""
    timeout_s: float = 600.0
    """Seconds one request may take before it is retried."""
    max_retries: int = 8
    """Retries of one request on 429, 5xx, timeouts and dropped connections before its example fails."""
    backoff_initial_s: float = 1.0
    """First retry delay; doubled each retry (with jitter), capped by backoff_max_s; a Retry-After header wins."""
    backoff_max_s: float = 60.0
    extra_body: dict[str, str | int | float | bool] = field(default_factory=dict)
    """More request fields, sent as they are (e.g. vLLM's skip_special_tokens: false)."""

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"generator.openai.base_url={self.base_url!r}; allowed: an http:// or https:// URL")
        if self.max_concurrency < 1 or self.max_retries < 0:
            raise ValueError("generator.openai.max_concurrency must be >= 1 and max_retries >= 0")
        if self.requests_per_second < 0 or not self.timeout_s > 0:
            raise ValueError("generator.openai.requests_per_second must be >= 0 and timeout_s > 0")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("generator.openai: allowed 0 < backoff_initial_s <= backoff_max_s")


BACKEND_NAMES = ("vllm", "hf", "openai")


@dataclass(kw_only=True)
class GeneratorConfig:
    """The teacher model and how it is reached."""

    backend: Literal["vllm", "hf", "openai"] = "vllm"
    """vllm: the offline vLLM engine on the inference protocol (TP inside a node; one replica per process);
    hf: transformers on one device (small models, tests); openai: an OpenAI-compatible endpoint."""
    model: str
    """HF folder or hub id of a chat model (vllm, hf); the served model name (openai). Paper: google/gemma-3-27b-it."""
    tp: int = 1
    """Tensor-parallel size of the vLLM engine (GPUs per replica)."""
    max_model_len: int = 8192
    """Longest prompt + completion the engine holds (vllm, hf)."""
    case_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=1024))
    """The case writer's decoding."""
    response_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=3072))
    """The answer's decoding."""
    vllm: VLLMBackendConfig = field(default_factory=VLLMBackendConfig)
    openai: OpenAIBackendConfig = field(default_factory=OpenAIBackendConfig)

    def __post_init__(self):
        if not self.model:
            raise ValueError("generator.model: empty; give a model folder, hub id or served model name")
        if self.tp < 1 or self.max_model_len < 2:
            raise ValueError("generator.tp must be >= 1 and generator.max_model_len >= 2")
        if self.backend == "hf" and self.tp != 1:
            raise ValueError(f"generator.tp={self.tp} with generator.backend=hf; allowed: 1 (use vllm for tp > 1)")
        for name in ("case_sampling", "response_sampling"):
            sampling = getattr(self, name)
            if sampling.max_new_tokens >= self.max_model_len and self.backend != "openai":
                raise ValueError(f"generator.{name}.max_new_tokens={sampling.max_new_tokens} leaves no room for the "
                                 f"prompt in generator.max_model_len={self.max_model_len}")


@dataclass(kw_only=True)
class ValidationConfig:
    """Which generations are kept; the rest go to rejected.jsonl with their reason and are retried."""

    enforce: bool = True
    """False: every verdict is still computed and stored, but only empty generations and chat-control
    tokens are rejected (for tests with random tiny models, which cannot follow the format)."""
    min_steps: int = 8
    """Fewest reasoning steps (lines) inside <think> (paper: 8)."""
    max_words_per_step: int = 10
    """Most words in one step (paper: 10)."""
    max_steps: int | None = None
    """Most steps (None: no bound)."""
    min_assessment_words: int = 40
    """Fewest words after </think>."""
    max_assessment_words: int | None = 1500
    """Most words after </think> (None: no bound)."""
    min_case_words: int = 40
    """Fewest words in the case."""
    max_case_words: int | None = 600
    """Most words in the case (None: no bound)."""
    allow_truncated: bool = False
    """Keep generations that hit max_new_tokens (False: rejected as truncated)."""
    max_retries: int = 2
    """Regenerations of a rejected case or answer; after that the example is recorded as failed."""

    def __post_init__(self):
        if self.min_steps < 1 or self.max_words_per_step < 1:
            raise ValueError("validation.min_steps and validation.max_words_per_step must be >= 1")
        if self.max_steps is not None and self.max_steps < self.min_steps:
            raise ValueError(f"validation.max_steps={self.max_steps} < validation.min_steps={self.min_steps}")
        for low, high in (("min_assessment_words", "max_assessment_words"), ("min_case_words", "max_case_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo < 0 or (hi is not None and hi < max(lo, 1)):
                raise ValueError(f"validation.{low}={lo}, validation.{high}={hi}; allowed: 0 <= {low} <= {high}")
        if self.max_retries < 0:
            raise ValueError(f"validation.max_retries={self.max_retries}; allowed: integers >= 0")


@dataclass(kw_only=True)
class DedupConfig:
    """Exact and near-duplicate removal over the case text (the first of a group is kept)."""

    enabled: bool = True
    field: Literal["case", "generation", "both"] = "case"
    """Text compared: the case (the SFT prompt), the answer, or both joined."""
    near_duplicate_jaccard: float = 0.8
    """Two texts whose word-shingle sets have at least this Jaccard similarity are near-duplicates."""
    shingle_words: int = 5
    """Words per shingle."""
    num_bands: int = 20
    """LSH bands; with rows_per_band they set which pairs are compared exactly (see dedup.py)."""
    rows_per_band: int = 6
    """MinHash values per band (num_bands * rows_per_band permutations)."""

    def __post_init__(self):
        if not 0 < self.near_duplicate_jaccard <= 1:
            raise ValueError(f"dedup.near_duplicate_jaccard={self.near_duplicate_jaccard}; allowed: (0, 1]")
        if self.shingle_words < 1 or self.num_bands < 1 or self.rows_per_band < 1:
            raise ValueError("dedup.shingle_words, num_bands and rows_per_band must be >= 1")


@dataclass(kw_only=True)
class BenchmarkFile:
    """One benchmark whose questions must not appear in the generated data."""

    name: Literal["medqa", "medmcqa", "pubmedqa", "mmlu_pro_medical"]
    path: str
    """Local file (.json/.jsonl/.parquet) or hub id, as `gazal decontam --data` takes."""

    KEY_PREFIX: ClassVar[str] = "decontam.benchmarks[i]"


@dataclass(kw_only=True)
class DecontamConfig:
    """Contamination check with `gazal decontam`'s n-gram rule (gazal_nemo/eval/decontam.py)."""

    benchmarks: list[BenchmarkFile] = field(default_factory=list)
    """Benchmarks to check against ([]: not checked, and the report says so)."""
    ngram: int = 8
    min_overlap: float = 0.5
    """Share of a question's n-grams inside one generated example that flags it."""
    split: str = "test"

    def __post_init__(self):
        if self.ngram < 1 or not 0 < self.min_overlap <= 1:
            raise ValueError(f"decontam.ngram={self.ngram}, decontam.min_overlap={self.min_overlap}; "
                             "allowed: ngram >= 1, 0 < min_overlap <= 1")


@dataclass(kw_only=True)
class SynthRecipe:
    """A synthesis run: what to generate, with which model, how it is checked, where it goes."""

    name: str
    """Names the dataset's files (`<name>-00000-of-00011.jsonl`)."""
    stage: Literal["synth"] = "synth"
    num_examples: int
    """Examples to make (paper: 107,033 kept)."""
    output_dir: str
    """Run folder: chunks/, data/, rejected.jsonl, report.{json,md}, rates.svg."""
    seed: int = 3407
    """Attribute draws and sampling seeds derive from it (paper's SFT seed)."""
    chunk_size: int = 256
    """Examples per chunk file: the unit of work, of resume and of sharding."""
    rows_per_file: int = 10000
    """Rows per file of the final dataset."""
    generator: GeneratorConfig
    design: DesignConfig = field(default_factory=DesignConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)

    def __post_init__(self):
        if self.num_examples < 1 or self.chunk_size < 1 or self.rows_per_file < 1:
            raise ValueError("num_examples, chunk_size and rows_per_file must be >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r}; allowed: a non-empty file-name stem")
        if not self.output_dir:
            raise ValueError("output_dir: empty; give the run folder")
        check_template(self.prompts.case_user, "prompts.case_user", set(CASE_FIELDS) | set(self.design.categorical))
        check_template(self.prompts.response_system, "prompts.response_system", set(RESPONSE_FIELDS))

    @property
    def num_chunks(self) -> int:
        return -(-self.num_examples // self.chunk_size)


# --- loading --------------------------------------------------------------------------------

# Dictionaries of the recipe whose keys are names the user chose (dotted path, what a key names).
_NAMED = (("design.modules", "module"), ("design.modules.*.factors", "factor"), ("design.factors", "factor"),
          ("design.categorical", "categorical attribute"), ("design.categorical.*.weights", "category value"),
          ("design.categorical.*.text", "category value"))


def _defaults_dict(cls) -> dict:
    """Plain-data defaults of a dataclass's fields that have one."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = to_dict(f.default_factory())
    return out


def _with_default_design(data: dict) -> dict:
    """The recipe with the default design sections written out where it leaves them out, so an
    override can name a default module and an unknown name can be told from a known one."""
    data = copy.deepcopy(data)
    design = data.get("design")
    if design is None:
        design = data["design"] = {}
    if isinstance(design, dict):
        for key, value in _defaults_dict(DesignConfig).items():
            design.setdefault(key, value)
    return data


def _check_named_keys(data: dict, overrides: list[str]) -> None:
    """An override into a named dictionary must name an entry the recipe has."""
    for text in overrides:
        path, _ = parse_override(text)
        for pattern, what in _NAMED:
            parts = pattern.split(".")
            if len(path) <= len(parts):
                continue
            node, matched = data, []
            for part, key in zip(parts, path):
                if part != "*" and part != key:
                    break
                node = node.get(key) if isinstance(node, dict) else None
                matched.append(key)
            else:
                name = path[len(parts)]
                if isinstance(node, dict) and name not in node:
                    known = ", ".join(node) or "none"
                    raise ValueError(f"override {text!r}: unknown {what} key {name!r} in {'.'.join(matched)} "
                                     f"(known: {known}); add new ones in the recipe file")


def load_synth_recipe(path: str | Path, overrides: list[str] | None = None) -> SynthRecipe:
    """YAML + dotted overrides -> SynthRecipe; ValueError naming the key for any mistake."""
    data = load_yaml(path)
    stage = data.get("stage", "synth")
    if stage in ("sft", "grpo"):
        raise ValueError(f"{path}: stage is {stage!r}; run it with `gazal {stage}`")
    data = _with_default_design(data)
    overrides = list(overrides or [])
    _check_named_keys(data, overrides)
    return from_dict(SynthRecipe, apply_overrides(data, overrides))
