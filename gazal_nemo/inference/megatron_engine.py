"""The megatron engine: generation on the (unwrapped) megatron model of this rank.

megatron-core's static KV cache (StaticInferenceContext) driven by our own sampling loop,
on the training model itself: no weight copy, so `sync_weights` only records the version.
Batched and left-padded; with `use_kv_cache=False` the same loop runs a full forward per
token ("torch", the plainest possible reference; tests check the two agree). Sampling
follows the settings through inference.sampling.filter_logits, the same filter the
trainer applies when it recomputes log-probs. All TP ranks draw with identically seeded
generators from identical gathered logits, so they agree on every token; one generator
draws the whole call, so the prompts of a group get independent samples.

Left padding is exact for Qwen3: RoPE makes attention depend only on relative positions,
and padded keys are masked out, so a row's tokens see what they would see unpadded.
Prompts longer than the model's context are answered `prompt_too_long`, and a
completion stops at the context limit (`length`).
"""

from __future__ import annotations

import torch

from gazal_nemo.inference.protocol import Completion, PushReport, SamplingSettings, prompt_too_long
from gazal_nemo.inference.sampling import sample_tokens, token_logprobs


class MegatronEngine:
    """Generation on this rank's megatron model stage; pp must be 1."""

    def __init__(self, model, *, stop_token_ids: list[int], pad_token_id: int, max_batch_size: int = 64,
                 use_kv_cache: bool = True, max_model_len: int | None = None):
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() > 1:
            raise ValueError("the megatron/torch engines need parallel.pp=1; use the vllm engine with pp>1")
        self.name = "megatron" if use_kv_cache else "torch"
        self.model = model
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)))
        self.pad_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.use_kv_cache = use_kv_cache
        self.max_model_len = max_model_len or getattr(model, "max_sequence_length", None)
        self.policy_version = 0

    def sync_weights(self, version: int) -> PushReport:
        """Nothing to copy: the engine generates with the training weights themselves."""
        self.policy_version = version
        return PushReport(version=version)

    def release_memory(self) -> None:
        """The KV cache lives only inside a generate call: nothing held between rollouts."""

    def close(self) -> None:
        """Nothing of its own to free: the model is the trainer's."""

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingSettings) -> list[Completion]:
        """One completion per prompt; the same seed on every TP rank keeps them in step."""
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
        limit = self.max_model_len
        fits = [i for i, p in enumerate(prompts) if limit is None or len(p) < limit]
        out: dict[int, Completion] = {i: prompt_too_long(i, self.policy_version)
                                      for i in sorted(set(range(len(prompts))) - set(fits))}
        try:
            for start in range(0, len(fits), self.max_batch_size):
                rows = fits[start:start + self.max_batch_size]
                for row, completion in zip(rows, self._generate_batch([list(prompts[i]) for i in rows], sampling,
                                                                      generator)):
                    completion.prompt_index = row
                    out[row] = completion
            return [out[i] for i in range(len(prompts))]
        finally:
            self.model.train(was_training)

    def _forward(self, tokens_BS, positions_BS, mask, context):
        kwargs = {"runtime_gather_output": True}
        if context is not None:
            kwargs["inference_context"] = context
        logits = self.model(tokens_BS, positions_BS, mask, **kwargs)
        return logits[:, -1].float()  # runtime_gather_output: full vocabulary on every TP rank

    def _generate_batch(self, prompts, sampling: SamplingSettings, generator):
        from megatron.core.inference.contexts import StaticInferenceContext

        device = next(self.model.parameters()).device
        batch, longest = len(prompts), max(len(p) for p in prompts)
        max_new = sampling.max_new_tokens
        if self.max_model_len is not None:
            max_new = min(max_new, self.max_model_len - longest)
        total = longest + max_new
        tokens = torch.full((batch, total), self.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros((batch, total), dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, longest - len(prompt):longest] = torch.tensor(prompt, device=device)
            valid[row, longest - len(prompt):longest] = True
        context = StaticInferenceContext(batch, total) if self.use_kv_cache else None
        stop_ids = self.stop_ids.to(device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        length = longest
        logits = self._step(tokens, valid, length, 0, context)  # prefill the prompts
        for _ in range(max_new):
            next_tok, next_logprob = _next_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                                  generator)
            next_tok = torch.where(finished, torch.full_like(next_tok, self.pad_id), next_tok.to(device))
            logprobs[:, length - longest] = next_logprob.to(device)
            tokens[:, length] = next_tok
            valid[:, length] = ~finished
            lengths += (~finished).long()
            finished |= torch.isin(next_tok, stop_ids)
            length += 1
            if bool(finished.all()) or length == total:
                break
            logits = self._step(tokens, valid, length, length - 1, context)
        return [Completion(prompt_index=row, tokens=tokens[row, longest:longest + lengths[row]].tolist(),
                           truncated=not bool(finished[row]), policy_version=self.policy_version,
                           logprobs=None if sampling.greedy else logprobs[row, :lengths[row]].tolist())
                for row in range(batch)]

    def _step(self, tokens, valid, length, new_from, context):
        """Logits for the next token; with a cache only tokens [new_from, length) are fed."""
        if context is None:
            new_from = 0
        feed = tokens[:, new_from:length]
        keys_valid = valid[:, :length]
        query_len = length - new_from
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()[new_from:length]
        allowed = causal[None] & keys_valid[:, None, :]
        # Rows whose every key is masked (pure padding queries) would give NaN: let them see themselves.
        allowed |= torch.eye(length, dtype=torch.bool, device=tokens.device)[new_from:length][None]
        mask = ~allowed[:, None]  # [B, 1, q, k], True = masked (megatron convention)
        positions = torch.arange(new_from, length, device=tokens.device).expand(tokens.shape[0], query_len)
        if context is not None:
            context.sequence_len_offset = new_from
            context.enable_decode_mode() if new_from > 0 else context.enable_prefill_mode()
        return self._forward(feed, positions, mask, context)


def _next_tokens(logits_BV, temperature, top_k, top_p, generator):
    """(tokens [B], their log-probs under the distribution sampled from [B]): greedy at
    temperature 0 (evaluation; log-probs 0), else the recipe's filtered sampling."""
    if temperature == 0:
        tokens = logits_BV.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    if 0 < top_k < logits_BV.shape[-1]:
        return _sample_top_k_then_p(logits_BV, temperature, top_k, top_p, generator)
    tokens = sample_tokens(logits_BV, temperature, top_k, top_p, generator=generator)
    return tokens, token_logprobs(logits_BV.float(), tokens.to(logits_BV.device), temperature, top_k, top_p)


def _sample_top_k_then_p(logits_BV, temperature, top_k, top_p, generator):
    """HF's order (temperature, top-k, top-p) with top-p over the k survivors only: no sort
    or host copy of the full [B, vocab] logits per token, which would dominate a rollout."""
    values_BK, index_BK = (logits_BV.float() / temperature).topk(top_k, dim=-1)  # descending
    probs_BK = values_BK.softmax(dim=-1)
    if top_p < 1.0:
        before_BK = probs_BK.cumsum(dim=-1) - probs_BK  # mass of the more likely tokens
        probs_BK = probs_BK * (before_BK < top_p)  # keeps the smallest set reaching top_p
    choice_B1 = torch.multinomial(probs_BK, 1, generator=generator)
    chosen_B = probs_BK.gather(-1, choice_B1).squeeze(-1) / probs_BK.sum(dim=-1)
    return index_BK.gather(-1, choice_B1).squeeze(-1), chosen_B.log()
