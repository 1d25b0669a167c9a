"""transformers `generate` on the engine protocol: the paper's own stack, a reference and a baseline.

Left-padded batches; greedy, or HF's temperature / top-k / top-p sampling. HF draws the
whole call from one torch generator seeded by the call, so a group's completions are
independent and the call is reproducible; it returns no log-probs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gazal_nemo.inference.protocol import Completion, SamplingSettings
from gazal_nemo.inference.source import ModelSource, device_dtype


class HFEngine:
    """A transformers causal LM behind the engine protocol."""

    name = "hf"

    def __init__(self, model, *, stop_ids: list[int], pad_id: int, max_batch_size: int):
        self.model, self.stop_ids, self.pad_id, self.max_batch_size = model, stop_ids, pad_id, max_batch_size
        self.policy_version = 0

    @torch.no_grad()
    def generate(self, prompts, sampling: SamplingSettings) -> list[Completion]:
        device = next(self.model.parameters()).device
        out = []
        torch.manual_seed(sampling.seed)
        options = (dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
                        top_p=sampling.top_p) if not sampling.greedy
                   else dict(do_sample=False, temperature=None, top_k=None, top_p=None))
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = [list(p) for p in prompts[start:start + self.max_batch_size]]
            longest = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad_id] * (longest - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], device=device)
            generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **options)
            for row, tokens in enumerate(generated[:, longest:].tolist()):
                end = next((i + 1 for i, t in enumerate(tokens) if t in self.stop_ids), None)
                out.append(Completion(prompt_index=start + row, tokens=tokens[:end] if end else tokens,
                                      truncated=end is None))
        return out


def build_hf_engine(source: ModelSource, *, work_dir: Path, stop_ids: list[int], pad_id: int,
                    max_batch_size: int) -> HFEngine:
    """HF weights of `source` (a megatron checkpoint is converted once into work_dir; an adapter merged by PEFT)."""
    from transformers import AutoModelForCausalLM

    device, dtype = device_dtype()
    hf_dir = hf_folder(source, work_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    if source.adapter_dir is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise ValueError("--engine hf with an adapter needs the peft package; use --engine megatron "
                             "(applies the adapter with gazal's own DoRA code)") from None
        model = PeftModel.from_pretrained(model, str(source.adapter_dir)).merge_and_unload().eval()
    return HFEngine(model, stop_ids=stop_ids, pad_id=pad_id, max_batch_size=max_batch_size)


def hf_folder(source: ModelSource, work_dir: Path) -> Path:
    """An HF folder with the weights of `source` (a megatron checkpoint converted once into work_dir)."""
    if source.megatron_ckpt is None:
        return source.hf_dir
    from gazal_nemo.convert.megatron_to_hf import convert_megatron_to_hf

    hf_dir = work_dir / "hf_from_megatron"
    if not (hf_dir / "config.json").is_file():
        convert_megatron_to_hf(source.megatron_ckpt, hf_dir, overwrite=True)
    return hf_dir
