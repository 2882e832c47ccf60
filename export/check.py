"""`dovetail-onnx check`: the artifact's greedy output against transformers' own `generate`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from dovetail_onnx.export.load import load_target
from dovetail_onnx.runtime import GeneratorParams, Model, generate


def check_against_transformers(artifact: Path, target: str, prompts: list[str], max_new_tokens: int,
                               mode: str = "speculative", progress: Callable[[], None] = lambda: None) -> list[dict]:
    """Per prompt: whether the runtime's tokens equal transformers' greedy tokens (EOS included, then stop)."""
    model = Model(artifact)
    reference, _ = load_target(target)
    eos = list(model.manifest.eos_token_ids)
    rows = []
    for text in prompts:
        prompt = model.encode_prompt(text)
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                     pad_token_id=eos[0])
        expected = out[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
        tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens, mode=mode))
        rows.append({"identical": tokens == expected[:cut], "tokens": len(tokens), "mean_accepted": stats.mean_accepted})
        progress()
    return rows
