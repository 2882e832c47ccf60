"""An exported target as the drafter's teacher: answers and features from the graph the drafter will serve.

By default the PyTorch model makes the training data (export/data.py). A quantized target is its own model:
int4 SmolLM2 keeps to fp32's greedy answer for 2.4 tokens on average (docs/benchmarks.md), so a drafter distilled
from fp32 proposes what the int4 target no longer says. This teacher runs the artifact's target graph through the
runtime's own `Target`, so its answers are exactly the artifact's target-only output and its features exactly
what the runtime hands the drafter. On dovetail's kernels it answers several prompts at once (the runtime's
continuous batching, exact as each alone), which on two cores makes about twice the tokens a second.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.export.drafter import target_source
from dovetail_onnx.runtime.batch import BatchEngine, batchable
from dovetail_onnx.runtime.buffers import PREFILL_CHUNK
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import GeneratorParams, Model
from dovetail_onnx.runtime.manifest import MANIFEST, load_manifest

ONE_ROW = np.zeros((1, 1, 1, 1), dtype=np.float32)  # a lone new token sees the whole past
BATCH = 8  # prompts answered at once where the kernels batch exactly; why 8: docs/training.md


class ArtifactTeacher:
    """The target graph of an artifact exported from the model being trained for (refused otherwise)."""

    def __init__(self, folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 threads: int | None = None):
        manifest = load_manifest(folder)
        source = json.loads((manifest.folder / MANIFEST).read_text()).get("source")
        if source is None:
            raise DovetailError(f"teacher artifact {folder} does not record the model it was exported from (an older "
                                "export); export it again from this target")
        ours = target_source(model, tokenizer)
        if wrong := [key for key in ours if source.get(key) != ours[key]]:
            raise DovetailError(f"teacher artifact {folder} was exported from another model ({wrong[0]}: "
                                f"{source.get(wrong[0])} vs {ours[wrong[0]]}); pass an artifact exported from this "
                                "target")
        spec = manifest.target
        self.model = Model(manifest.folder, draft_device="cpu", threads=threads)
        self.target = self.model.target
        self.eos = set(manifest.eos_token_ids)
        self.precision = spec.precision
        graph = {name: manifest.checksums[name] for name in (self.target.graph.name, f"{spec.file}.data")
                 if name in manifest.checksums}
        self.digest = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()[:16]

    def greedy_answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each prompt's greedy answer, as (prompt + answer ids, the final hidden state of each), like
        data.greedy_answers: the last answer token (EOS or the cap) is run once more so its feature is known too."""
        if batchable(self.model, speculative=False) is None:
            return self._batched_answers(prompts, max_new_tokens)
        rows, target, first = [], self.target, np.arange(1)
        for prompt in prompts:
            target.start(len(prompt) + max_new_tokens + 1, PREFILL_CHUNK)
            logits, prompt_features = target.prefill(np.array(prompt, dtype=np.int64))
            answer, features = [], [prompt_features]
            while len(answer) < max_new_tokens and (not answer or answer[-1] not in self.eos):
                answer.append(int(logits.argmax()))
                # The next forward overwrites its outputs in place: the argmax above is taken first, features copied.
                step_logits, hidden = target.forward(np.array(answer[-1:]), np.array([target.kv.length]), ONE_ROW)
                target.kv.keep(first)
                logits = step_logits[0]
                features.append(hidden.copy())
            rows.append((torch.tensor(prompt + answer), torch.from_numpy(np.concatenate(features)).half()))
        return rows

    def _batched_answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`greedy_answers` with BATCH prompts decoding at once: a finished answer steps once more, so that its last
        token's row (and feature) is computed; the token that step adds is not part of the answer."""
        engine = BatchEngine(self.model, speculative=False)
        params = GeneratorParams(max_new_tokens, mode="target-only")
        order, answers, closing, waiting = {}, {}, {}, list(enumerate(prompts))
        try:
            while waiting or engine.active:
                while waiting and len(engine.active) < BATCH:
                    index, prompt = waiting.pop(0)
                    order[engine.add(prompt, params)] = index
                engine.step()
                for seq in list(engine.active):
                    if seq in closing:
                        engine.remove(seq)
                        ids = seq.prompt.tolist() + closing[seq]
                        features = np.concatenate(seq.features)[: len(ids)]
                        answers[order[seq]] = (torch.tensor(ids), torch.from_numpy(features).half())
                    elif seq.done:
                        closing[seq], seq.done = list(seq.tokens), False
        finally:
            engine.close()
        return [answers[i] for i in range(len(prompts))]

    def text_features(self, windows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Teacher-forced final hidden states of each window."""
        rows = []
        for window in windows:
            self.target.start(len(window), PREFILL_CHUNK)
            _, features = self.target.prefill(np.array(window, dtype=np.int64))
            rows.append((torch.tensor(window), torch.from_numpy(features).half()))
        return rows
