"""Where a completion ends: the stop tokens and the decoded text, shared by GRPO and evaluation.

One definition, so a benchmark score and the accuracy reward read the same text: generation
stops at EOS, <|im_end|> or <|endoftext|> (whichever the tokenizer has), and the stop token
itself is not part of the text (the <think> tags are, for the format reward).
"""

from __future__ import annotations


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus Qwen's end-of-turn and end-of-text tokens, where the tokenizer knows them."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def completion_text(tokenizer, tokens: list[int], stop_ids: list[int]) -> str:
    """Decoded completion without its stop token; <think> tags are kept for the format reward."""
    if tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=False)
