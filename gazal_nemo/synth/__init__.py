"""`gazal synth`: the paper's structured clinical-reasoning SFT dataset (section 3.1.1), generated,
validated, deduplicated and decontaminated, in the `messages` format `gazal sft` reads.

One example is two chat calls to a teacher model: a case writer turns the example's sampled
attributes (module, complexity, demographics, confounding factors) into a clinical vignette,
then the teacher answers it under the SFT system prompt B.1 plus the module's reasoning
pattern and the Chain-of-Draft bounds. The kept example is B.1 + the case + the answer.

Modules (one concern each):
  config      the recipe schema (SynthRecipe) and its loader
  attributes  per-example attribute draws (counter-based, so sharding and resume draw alike)
  prompts     the paper's default prompts and their rendering
  validate    structure and Chain-of-Draft checks of a generation
  chat        what the generator needs from a teacher: the ChatBackend protocol and ChatResult
  backends    messages -> text: any engine on the inference protocol, or an OpenAI-compatible endpoint
  openai_http the HTTP client behind the OpenAI backend (concurrency, rate limit, retries)
  generate    one chunk of examples: rounds of generation, validation and retries
  chunks      chunk files, the run's identity and the per-shard locks (nothing partial read as complete)
  dedup       exact and MinHash/LSH near-duplicate removal
  finalize    chunks -> dataset folder, rejects, report
  report      rates against targets with intervals, acceptance, throughput, the chart
  stats       binomial intervals

It imports neither GRPO (rl/, stages/) nor evaluation internals: of eval/ only `gazal decontam`'s
n-gram machinery and the benchmark loader that command uses (tests/unit/test_synth_imports.py).
NeMo Data Designer was weighed as the engine of this stage; docs/SYNTH.md says why it is not.
"""
