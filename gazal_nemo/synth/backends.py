"""Chat backends: conversations (role/content messages) in, generated text out.

Synthesis talks to its teacher in messages, not token ids, so it can use either
  * any engine on the inference protocol (`EngineChatBackend`): the model's own chat
    template renders the messages, the tokenizer encodes them, `engine.generate` samples
    (vLLM offline with TP inside the node, or transformers), and the completion is decoded
    with the stop token dropped (inference.stopping, as GRPO and `gazal eval` decode); or
  * an OpenAI-compatible endpoint (`synth.openai_http.OpenAIChatBackend`), where the server
    applies the template.

A backend is chosen by `generator.backend` and built by its entry in `BACKENDS`; `check_backend`
refuses what would fail later (a model folder that is not a chat model, vLLM missing, an
endpoint that does not answer or does not serve the model, an API key variable that is not
set) in one line, before anything is generated. The dry run calls it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gazal_nemo.inference.protocol import SamplingSettings
from gazal_nemo.synth.chat import ChatBackend, ChatResult


class EngineChatBackend:
    """Messages -> chat template -> token ids -> engine.generate -> decoded text."""

    def __init__(self, engine, tokenizer, stop_ids: list[int], *, name: str):
        self.engine, self.tokenizer, self.stop_ids, self.name = engine, tokenizer, stop_ids, name
        self._requests = 0

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template wrote every special token; the tokenizer must not add BOS/EOS again.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingSettings) -> list[ChatResult]:
        from gazal_nemo.inference.stopping import completion_text

        prompts = [self.encode(messages) for messages in conversations]
        self._requests += len(prompts)
        completions = self.engine.generate(prompts, sampling)
        return [ChatResult(text=completion_text(self.tokenizer, c.tokens, self.stop_ids) if c.tokens else "",
                           finish_reason=c.finish_reason, prompt_tokens=len(prompt), completion_tokens=len(c.tokens))
                for prompt, c in zip(prompts, completions)]

    def stats(self) -> dict[str, int]:
        return {"requests": self._requests}

    def close(self) -> None:
        self.engine = None


# --- building and checking -----------------------------------------------------------------


def _build_engine_backend(recipe, work_dir: Path) -> EngineChatBackend:
    from gazal_nemo.inference.registry import StandaloneOptions, build_standalone_engine
    from gazal_nemo.inference.source import load_tokenizer, resolve_model
    from gazal_nemo.inference.stopping import stop_token_ids
    from gazal_nemo.inference.vllm_engine import VLLMSettings

    gen = recipe.generator
    source = resolve_model(gen.model, work_dir=work_dir)
    tokenizer = load_tokenizer(source)
    stop_ids = stop_token_ids(tokenizer)
    vllm = VLLMSettings(gpu_memory_utilization=gen.vllm.gpu_memory_utilization, max_num_seqs=gen.vllm.max_num_seqs,
                        cpu_kv_cache_gib=gen.vllm.cpu_kv_cache_gib)
    options = StandaloneOptions(tp=gen.tp, work_dir=work_dir, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
                                max_batch_size=min(recipe.chunk_size, gen.vllm.max_num_seqs),
                                max_model_len=gen.max_model_len, seed=recipe.seed, vllm=vllm)
    start = time.time()
    engine = build_standalone_engine(gen.backend, source, options)
    print(f"synth: {gen.backend} engine on {source.hf_dir} ready in {time.time() - start:.1f}s", flush=True)
    return EngineChatBackend(engine, tokenizer, stop_ids, name=gen.backend)


def _build_openai_backend(recipe, work_dir: Path):
    from gazal_nemo.synth.openai_http import OpenAIChatBackend, api_key

    gen = recipe.generator
    return OpenAIChatBackend(gen.openai, model=gen.model, api_key=api_key(gen.openai))


BACKENDS: dict[str, Callable] = {
    "vllm": _build_engine_backend,
    "hf": _build_engine_backend,
    "openai": _build_openai_backend,
}


def build_backend(recipe, *, work_dir: Path) -> ChatBackend:
    """The backend `generator.backend` names, ready to generate."""
    return BACKENDS[recipe.generator.backend](recipe, Path(work_dir))


def check_backend(recipe, *, dry_run: bool) -> str:
    """Refuse a teacher that cannot work, in one line; a line describing it when it can."""
    gen = recipe.generator
    if gen.backend == "openai":
        from gazal_nemo.synth.openai_http import api_key, check_endpoint

        return check_endpoint(gen.openai, model=gen.model, api_key=api_key(gen.openai))
    from gazal_nemo.hub import resolve_model_dir

    model_dir = resolve_model_dir(gen.model, config_only=dry_run, what="generator.model")
    config = json.loads((model_dir / "config.json").read_text())
    longest = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(longest, int) and gen.max_model_len > longest and not config.get("rope_scaling"):
        raise ValueError(f"generator.max_model_len={gen.max_model_len} is longer than {model_dir}/config.json's "
                         f"max_position_embeddings={longest}; allowed: <= {longest}")
    if gen.backend == "vllm":
        from gazal_nemo.inference.vllm_engine import require_vllm

        require_vllm()
    return f"{gen.backend} engine on {model_dir} (tp {gen.tp}, max_model_len {gen.max_model_len})"
