"""The vLLM engine, colocated with the megatron trainer, on the real vLLM (the CPU build) at TP=1
and TP=2 (two real gloo processes sharing the world with vLLM's external launcher), fp32:

* greedy completions equal the megatron engine's on the same weights, token for token, and
  both end a completion at its stop token (kept, finish_reason "stop"); a prompt longer than
  the engine's context is answered "prompt_too_long", one near it gets only the room left;
* a group's completions are independent samples, and the same seed draws them again;
* TIS: vLLM's sampler log-probs (processed: temperature, top-k, top-p) equal the trainer's
  filtered log-probs of the same tokens, so the importance weights are 1 (within 1e-4);
* after an optimizer step and a push the gate finds vLLM scoring its probe as the trainer
  does (fp32 tolerance 1e-5), full-parameter and DoRA (pushed merged);
* a skipped push, and a push that sends one stale tensor, trip the gate, and its message
  names the parameter group vLLM holds stale.

One process launch per TP size checks both the full-parameter model and a DoRA adapter on it
(the first engine is closed and a second built), which also checks that closing an engine
leaves the trainer's process group usable.
"""

import math

import pytest

from gazal_nemo.testing.multiproc import run_distributed

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 33, 90, 4], [200, 7], [11, 12, 13, 14, 15, 16, 17, 18]]
PROBE = list(range(5, 69))
STALE = "model.layers.1.mlp.down_proj.weight"


def _train_step(model, shape, optimizer):
    """One real optimizer step: next-token cross-entropy on the probe."""
    import torch

    from gazal_nemo.inference.sampling import vocab_parallel_token_logprobs
    from gazal_nemo.peft.dora import invalidate_dora_norms

    ids = torch.tensor([PROBE])
    logits = model(ids, torch.arange(len(PROBE))[None], None)
    loss = -vocab_parallel_token_logprobs(logits[:, :-1], ids[:, 1:], 1.0, 0, 1.0).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    invalidate_dora_norms(model)


def _sampler_trainer_gap(model, prompt, completion) -> float:
    """max |pi_trainer / pi_sampler - 1| over the completion's tokens (the TIS weight's distance from 1)."""
    import torch

    from gazal_nemo.inference.sampling import vocab_parallel_token_logprobs

    ids = torch.tensor([prompt + completion.tokens])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
    trainer = vocab_parallel_token_logprobs(logits[:, len(prompt) - 1:-1], ids[:, len(prompt):], 1.0, 20, 0.95)[0]
    sampler = torch.tensor(completion.logprobs)
    return float((trainer.double() - sampler.double()).exp().sub(1).abs().max())


def _checks(hf_dir, tp, adapter) -> dict:
    import torch
    from transformers import AutoTokenizer

    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.inference.megatron_engine import MegatronEngine
    from gazal_nemo.inference.protocol import SamplingSettings
    from gazal_nemo.inference.push_gate import WeightPushError
    from gazal_nemo.inference.registry import PolicyContext, build_policy_engine
    from gazal_nemo.inference.stopping import stop_token_ids
    from gazal_nemo.inference.weight_push import hf_weight_buckets
    from gazal_nemo.recipe import RolloutConfig

    shape, model = qwen3_from_hf(hf_dir, tp=tp, params_dtype=torch.float32)
    if adapter:
        from gazal_nemo.peft.config import AdapterConfig
        from gazal_nemo.peft.dora import apply_adapter

        apply_adapter(model, AdapterConfig(rank=4, alpha=8, dropout=0.0), shape, seed=0)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    stop_ids = stop_token_ids(tokenizer)
    engine = build_policy_engine("vllm", PolicyContext(
        model=model, shape=shape, hf_dir=str(hf_dir), tp=tp, dp=1, dtype="fp32", seed=0, max_model_len=128,
        stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, probe=PROBE), RolloutConfig(engine="vllm"))
    out = {"first_push": engine.sync_weights(0).max_logprob_diff}
    greedy = SamplingSettings(max_new_tokens=12)
    megatron = MegatronEngine(model, stop_token_ids=stop_ids, pad_token_id=tokenizer.pad_token_id, max_batch_size=8)
    out["greedy"] = ([c.tokens for c in engine.generate(PROMPTS, greedy)],
                     [c.tokens for c in megatron.generate(PROMPTS, greedy)])
    stop = out["greedy"][0][0][3]  # the 4th greedy token becomes a stop token on both engines
    engine.stop_ids, megatron.stop_ids = [stop], torch.tensor([stop])
    out["stopped"] = [(c.tokens, c.finish_reason) for c in (engine.generate(PROMPTS[:1], greedy)[0],
                                                            megatron.generate(PROMPTS[:1], greedy)[0])]
    engine.stop_ids = stop_ids
    too_long, edge = list(range(5, 5 + 130)), list(range(5, 5 + 120))  # max_model_len 128
    out["limits"] = [(c.finish_reason, len(c.tokens), c.truncated)
                     for c in engine.generate([too_long, edge], SamplingSettings(max_new_tokens=16))]
    sampling = SamplingSettings(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, seed=1234)
    group = engine.generate([PROMPTS[0]] * 4, sampling)
    out["group"] = [c.tokens for c in group]
    out["group_again"] = [c.tokens for c in engine.generate([PROMPTS[0]] * 4, sampling)]
    out["group_other_seed"] = [c.tokens for c in engine.generate(
        [PROMPTS[0]] * 4, SamplingSettings(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.95, seed=99))]
    out["tis_gap"] = max(_sampler_trainer_gap(model, PROMPTS[0], c) for c in group)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_step(model, shape, optimizer)
    out["after_step"] = engine.sync_weights(1).max_logprob_diff
    before = {name: t.clone() for bucket in hf_weight_buckets(model, shape, bucket_bytes=1 << 30) for name, t in bucket}
    _train_step(model, shape, optimizer)
    try:  # the push of step 2 is skipped
        engine.gate.check(engine, 2)
        out["skipped"] = None
    except WeightPushError as e:
        out["skipped"] = str(e)

    def one_stale(buckets):
        for bucket in buckets:
            yield [(name, before[name] if name == STALE else tensor) for name, tensor in bucket]

    engine.push(one_stale(hf_weight_buckets(model, shape, bucket_bytes=64 << 10)), 2)
    try:
        engine.gate.check(engine, 2)
        out["stale"] = None
    except WeightPushError as e:
        out["stale"] = str(e)
    out["repaired"] = engine.sync_weights(2).max_logprob_diff  # a full push heals it
    engine.close()
    return out


def _both_models(hf_dir, tp) -> dict:
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=tp)
    return {"full": _checks(hf_dir, tp, adapter=False), "dora": _checks(hf_dir, tp, adapter=True)}


@pytest.mark.parametrize("tp", [1, 2])
def test_colocated_vllm_matches_the_trainer_and_the_gate_catches_stale_weights(tiny_vllm_dir, tp):
    per_rank = run_distributed(_both_models, tp, str(tiny_vllm_dir), tp)
    assert all(rank == per_rank[0] for rank in per_rank), "TP ranks disagree"
    for kind, out in per_rank[0].items():
        vllm_greedy, megatron_greedy = out["greedy"]
        assert vllm_greedy == megatron_greedy, kind
        first_stop = vllm_greedy[0].index(vllm_greedy[0][3]) + 1
        assert out["stopped"] == [(vllm_greedy[0][:first_stop], "stop")] * 2, out["stopped"]
        too_long, edge = out["limits"]
        assert too_long == ("prompt_too_long", 0, True), too_long
        assert edge[0] in ("length", "stop") and 1 <= edge[1] <= 8, edge  # clipped to the 8 tokens of room
        assert len(set(map(tuple, out["group"]))) == 4, f"{kind}: a group's completions are copies"
        assert out["group_again"] == out["group"], f"{kind}: the same seed drew other completions"
        assert out["group_other_seed"] != out["group"]
        assert out["tis_gap"] < 1e-4, kind
        assert out["first_push"] < 1e-5 and out["after_step"] < 1e-5 and out["repaired"] < 1e-5, kind
        assert out["skipped"] is not None, f"{kind}: a skipped push passed the gate"
        assert "vLLM holds" in out["skipped"] or "last pushed at version(s) [1]" in out["skipped"], out["skipped"]
        assert out["stale"] is not None, f"{kind}: a stale tensor passed the gate"
        assert "largest-differing parameter group: layer 1 mlp" in out["stale"], out["stale"]
        assert STALE in out["stale"] and "1 of 25 tensors" in out["stale"], out["stale"]
    assert not math.isnan(per_rank[0]["dora"]["after_step"])
