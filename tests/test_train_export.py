"""Train → export → generate: a trained drafter goes through the whole path and output stays exact."""
from __future__ import annotations

import torch
from rich.console import Console

from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.export.data import Sequence
from dovetail_onnx.export.drafter import save_drafter
from dovetail_onnx.export.train import TrainSettings, train_drafter
from dovetail_onnx.runtime import GeneratorParams, Model, generate
from tiny import make_model, make_tokenizer


def own_greedy_sequences(model, count: int = 24, length: int = 48) -> list[Sequence]:
    """The tiny target's own greedy continuations with their final-norm features (what train consumes)."""
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for n in range(count):
        prompt = torch.randint(3, model.config.vocab_size, (1, 4), generator=generator)
        with torch.no_grad():
            ids = model.generate(prompt, max_new_tokens=length, do_sample=False, eos_token_id=None, pad_token_id=0)
            features = model(ids, output_hidden_states=True).hidden_states[-1][0]
        sequences.append(Sequence(ids[0], features.half(), "distill", 4, heldout=n % 6 == 0))
    return sequences


def test_trained_drafter_exports_and_stays_exact(hf_dirs, tmp_path, references):
    """Its MLP narrower than the target's (`train --intermediate-size`, as a large target's drafter is)."""
    target, tokenizer = make_model("llama"), make_tokenizer()
    settings = TrainSettings(steps=60, batch_tokens=512, warmup=5, checkpoint_every=1000, bf16=False,
                             intermediate_size=48)
    drafter, metrics = train_drafter(target, tokenizer, own_greedy_sequences(target), settings, progress=False)
    save_drafter(drafter, tmp_path / "drafter", "fp16")

    export_artifact(hf_dirs["llama"], tmp_path / "artifact", str(tmp_path / "drafter"), console=Console(quiet=True))
    model = Model(tmp_path / "artifact", draft_device="cpu")
    for text in ("trained drafter", "another prompt"):
        prompt = model.encode_prompt(text, raw=True)
        tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens=60, stop_at_eos=False))
        assert tokens == references("llama", prompt, 60)
        assert stats.mean_accepted > 1.0  # it learned something the tree can use
