"""Tiny, deterministic Qwen3 checkpoints and tokenizers made at run time (`gazal demo`, the tests).

Nothing can be downloaded in tests or in the demo, so both build a real Hugging Face
folder here: a byte-level BPE tokenizer trained on a fixed corpus (with Qwen's chat
special tokens and a ChatML template) and a randomly initialised Qwen3ForCausalLM with
GQA and qk-norm, saved as sharded safetensors with an index like the hub checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# ChatML as Qwen uses it; a generation prompt opens the assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "A 65-year-old man presents with chest pain, dyspnea and elevated troponin.",
    "The ECG shows ST elevation in leads II, III and aVF: inferior STEMI.",
    "Which of the following is the most likely diagnosis? A. B. C. D. E.",
    "Answer with the letter of the correct option: \\boxed{A} \\boxed{B} \\boxed{C} \\boxed{D} \\boxed{E}",
    "Consider differential diagnoses by system and rule out critical conditions.",
    "Pathophysiology connects symptoms to underlying disease mechanisms.",
    "Treatment plan: aspirin, heparin, emergent PCI; follow-up with echocardiogram.",
    "Final Answer Assessment Step reasoning question options correct wrong the of and to in is",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()[]{}<>/\\-_+=*#'\"",
]


def make_tiny_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 384):
    """Train a byte-level BPE on a fixed corpus and save it as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    return hf_tok


def tiny_qwen3_config(vocab_size: int, **overrides):
    """A Qwen3Config small enough for CPU tests: GQA (4 heads, 2 groups), qk-norm, 2 layers."""
    from transformers import Qwen3Config

    fields = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        torch_dtype="float32",
        bos_token_id=None,
    )
    fields.update(overrides)
    return Qwen3Config(**fields)


def make_tiny_qwen3(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    max_shard_size: str = "40KB",
    init_std: float = 0.2,
    **config_overrides,
) -> Path:
    """Write a random-init Qwen3 HF checkpoint with tokenizer; returns the folder.

    A large init_std makes logits far from uniform, so parity tests compare real
    signal rather than near-zero numbers. Shards are small so loaders meet the index.
    """
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    tok = make_tiny_tokenizer(out_dir)
    config = tiny_qwen3_config(len(tok), **config_overrides)
    config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, init_std)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    return out_dir


