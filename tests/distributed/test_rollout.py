"""The megatron rollout engine: KV-cache generation on the training model.

Greedy decoding with left-padded prompts of different lengths must give exactly the
tokens transformers' generate gives for each prompt alone; the cached and uncached
engines must agree when sampling with the same seed; stop tokens end a completion.
"""

import torch

from gazal_nemo.testing.multiproc import run_distributed

PROMPTS = [[5, 17, 33, 90, 4], [200, 7], [11, 12, 13, 14, 15, 16, 17, 18]]
MAX_NEW = 12


def _hf_greedy(hf_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def _generate(hf_dir, tp, stop_ids, temperature, seed, use_kv_cache, top_k=20):

    from gazal_nemo.convert.load_hf import qwen3_from_hf
    from gazal_nemo.inference.megatron_engine import MegatronEngine
    from gazal_nemo.inference.protocol import SamplingSettings
    from gazal_nemo.parallel import init_parallel

    init_parallel(tp=tp)
    _, model = qwen3_from_hf(hf_dir, tp=tp)
    engine = MegatronEngine(model, stop_token_ids=stop_ids, pad_token_id=0, max_batch_size=8,
                            use_kv_cache=use_kv_cache)
    completions = engine.generate(PROMPTS, SamplingSettings(max_new_tokens=MAX_NEW, temperature=temperature,
                                                            top_k=top_k, top_p=0.95, seed=seed))
    return [(c.prompt_index, c.tokens, c.truncated) for c in completions]


def test_greedy_matches_transformers_with_left_padding(tiny_hf_dir):
    ref = _hf_greedy(tiny_hf_dir)
    for use_kv_cache in (True, False):
        got = run_distributed(_generate, 1, str(tiny_hf_dir), 1, [], 0.0, 0, use_kv_cache)[0]
        assert [tokens for _, tokens, _ in got] == ref
        assert all(truncated for _, _, truncated in got)


def test_tp2_sampling_agrees_across_ranks_and_with_uncached(tiny_hf_dir):
    cached = run_distributed(_generate, 2, str(tiny_hf_dir), 2, [], 0.6, 123, True)
    assert cached[0] == cached[1], "TP ranks sampled different tokens"
    uncached = run_distributed(_generate, 1, str(tiny_hf_dir), 1, [], 0.6, 123, False)[0]
    assert cached[0] == uncached


def test_stop_token_ends_completion(tiny_hf_dir):
    ref = _hf_greedy(tiny_hf_dir)
    stop = ref[0][3]  # the 4th greedy token of prompt 0 becomes a stop token
    got = run_distributed(_generate, 1, str(tiny_hf_dir), 1, [stop], 0.0, 0, True)[0]
    index, tokens, truncated = got[0]
    first = ref[0].index(stop)
    assert tokens == ref[0][:first + 1] and not truncated


def test_top_k_then_p_sampler_draws_from_the_filtered_distribution():
    """The rollout's fast path samples exactly filter_logits' distribution (HF order)."""
    from gazal_nemo.inference.megatron_engine import _sample_top_k_then_p
    from gazal_nemo.inference.sampling import filter_logits

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(3)) * 2
    expected = filter_logits(logits, 0.7, 5, 0.8).softmax(-1)[0]
    draws, logprobs = _sample_top_k_then_p(logits.expand(40000, -1), 0.7, 5, 0.8, torch.Generator().manual_seed(0))
    observed = torch.bincount(draws, minlength=50).float() / draws.numel()
    assert set(observed.nonzero().flatten().tolist()) == set(expected.nonzero().flatten().tolist())
    assert (observed - expected).abs().max() < 0.01
    # The sampler's log-prob of each draw (for truncated importance sampling) is its filtered probability.
    torch.testing.assert_close(logprobs, expected.log()[draws], rtol=1e-5, atol=1e-6)
