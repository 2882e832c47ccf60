"""The public API: `Model` (an artifact loaded), `GeneratorParams`, `Generator`.

The whole speculative loop is `_speculative` below: draft a tree, verify it in one target forward,
accept the longest greedy path plus a bonus token, keep those rows of the KV caches, repeat.

A model's KV caches outlive a generation: the next one keeps the rows its prompt shares with the
last one's tokens (the earlier turns of a conversation) and prefills only the rest. The caches
belong to the model, so a model runs one generation at a time: a `Generator` holds the model's
lock from its creation until it is done or closed.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dovetail_onnx.runtime.draft_model import DraftModel
from dovetail_onnx.runtime.drafter import Drafter
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.lookup import Copier
from dovetail_onnx.runtime.manifest import TreeSettings, load_manifest
from dovetail_onnx.runtime.sampling import SamplingParams
from dovetail_onnx.runtime.sessions import usable_cores
from dovetail_onnx.runtime.target import Target
from dovetail_onnx.runtime.tree import Tree
from dovetail_onnx.runtime.tokenizer import Tokenizer
from dovetail_onnx.runtime.verify import accept_greedy, accept_sampled

MODES = ("speculative", "target-only")


class Model:
    """An exported artifact: manifest, tokenizer, target session (CPU) and drafter: a trained drafter, a standalone
    draft model, or None where prompt lookup drafts alone."""

    def __init__(self, folder: str | Path, draft_device: str = "auto", threads: int | None = None,
                 draft_threads: int | None = None, verify_checksums: bool = True):
        for name, value in (("threads", threads), ("draft_threads", draft_threads)):
            if value is not None and not (type(value) is int and 1 <= value <= usable_cores()):
                raise DovetailError(f"{name} must be from 1 to this machine's {usable_cores()} cores, got {value!r}; "
                                    "more threads than cores stall ONNX Runtime")
        self.manifest = load_manifest(folder, verify=verify_checksums)
        self.tokenizer = Tokenizer(self.manifest.folder, self.manifest.chat_template, self.manifest.special_tokens)
        self.target = Target(self.manifest.folder / self.manifest.target.file, self.manifest.target, threads)
        threads_for_draft = draft_threads or threads
        self.drafter: Drafter | DraftModel | None = (
            Drafter(self.manifest, draft_device, threads_for_draft) if self.manifest.drafter
            else DraftModel(self.manifest, draft_device, threads_for_draft) if self.manifest.draft_model else None)
        # Token ids of the last generation (prompt + every token its loop produced); the caches' rows are K/V of a
        # prefix of these.
        self.history: list[int] = []
        self.lock = threading.Lock()

    @property
    def tree(self) -> TreeSettings:
        """The artifact's default draft tree on the target graph that runs (a chain on one that verifies chains)."""
        return self.manifest.tree.on(self.target.verify)

    @property
    def draft_provider(self) -> str:
        """Where drafting runs: the drafter session's execution provider, or prompt lookup (no model at all)."""
        return self.drafter.session.get_providers()[0] if self.drafter else "prompt lookup"

    @property
    def draft_graph(self) -> str | None:
        return self.drafter.graph if self.drafter else None

    def encode_prompt(self, text: str, raw: bool = False, special: bool = False) -> list[int]:
        """`raw`: the text as is (its special-token strings are control tokens: it is the user's own template);
        otherwise one user message, plain text unless `special` opts in."""
        if raw:
            return self.tokenizer.encode(text)
        return self.tokenizer.chat([{"role": "user", "content": text}], special=special)


@dataclass
class GeneratorParams:
    max_new_tokens: int = 256
    mode: str = "speculative"
    tree: TreeSettings | None = None  # None: the artifact's defaults
    stop_at_eos: bool = True
    eos_token_ids: tuple[int, ...] | None = None  # None: the artifact's
    sampling: SamplingParams = SamplingParams()  # greedy unless a temperature is set
    lookup: bool = True  # also draft by prompt lookup (runtime/lookup.py)

    def check(self, model: Model, prompt_len: int) -> None:
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 1:
            raise DovetailError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.mode not in MODES:
            raise DovetailError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        self.sampling.check(model.manifest.target.vocab_size)
        if self.mode == "speculative" and not self.lookup and not model.drafter:
            raise DovetailError("--no-lookup leaves nothing to draft with: this artifact has no trained drafter and "
                                "drafts by prompt lookup; drop --no-lookup, or use --mode target-only")
        target = model.target
        if problem := self.tree.problem(model.manifest.max_top_k) or self.tree.chain_problem(target.verify,
                                                                                             target.chains_why):
            raise DovetailError(f"{problem} (tree limits of this artifact's graphs)")
        if prompt_len < 1:
            raise DovetailError("the prompt is empty; give some text")
        context = model.manifest.context_length
        if prompt_len + self.max_new_tokens > context:
            raise DovetailError(
                f"prompt ({prompt_len} tokens) + --max-new-tokens ({self.max_new_tokens}) exceeds the model's "
                f"context of {context} tokens; shorten the prompt or lower --max-new-tokens"
            )


@dataclass
class Stats:
    new_tokens: int = 0
    target_forwards: int = 0  # decode forwards; the prefill is counted apart
    cached_tokens: int = 0  # prompt tokens whose K/V were kept from the last generation, not prefilled
    accepted_copied: int = 0  # accepted draft tokens that came from prompt lookup, not from the drafter
    draft_forwards: int = 0  # drafter forwards of the decode steps
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accepted: list[int] = field(default_factory=list)

    @property
    def mean_accepted(self) -> float:
        """Tokens per decode target forward (τ); the prefill's first token is not counted."""
        return (self.new_tokens - 1) / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "new_tokens": self.new_tokens,
            "target_forwards": self.target_forwards,
            "cached_tokens": self.cached_tokens,
            "accepted_drafted": sum(self.accepted) - len(self.accepted) - self.accepted_copied,
            "accepted_copied": self.accepted_copied,
            "draft_forwards": self.draft_forwards,
            "mean_accepted": round(self.mean_accepted, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "host_s": round(max(self.decode_s - self.draft_s - self.verify_s, 0.0), 4),
        }


class Generator:
    """Step-wise generation in the manner of onnxruntime-genai: `generate_next_token()` until `is_done()`.

    One step is one target forward, so it may append several tokens. The generator holds its model
    until it is done, closed or garbage-collected; a second one on the same model meanwhile is refused.
    """

    def __init__(self, model: Model, params: GeneratorParams, prompt: list[int]):
        self._holds_model = False
        params = checked(model, params, prompt)
        self.model, self.params, self.stats = model, params, Stats()
        self.prompt = np.asarray(prompt, dtype=np.int64)
        self.tokens: list[int] = []
        self._done = False
        loop = _speculative if params.mode == "speculative" else _target_only
        self._steps = loop(model, self.prompt, params, self.stats)
        if not model.lock.acquire(blocking=False):
            raise DovetailError("the model is busy with another generation; finish or close() that one first, "
                                "or load a second Model")
        self._holds_model = True

    def is_done(self) -> bool:
        return self._done

    def close(self) -> None:
        """Stop here and free the model for the next generation (its caches keep what this one computed)."""
        self._done = True
        if self._holds_model:
            self._steps.close()
            self._holds_model = False
            self.model.lock.release()

    def __del__(self) -> None:
        self.close()

    def generate_next_token(self) -> list[int]:
        """Run one step; returns the tokens it added (after EOS / max_new_tokens trimming)."""
        if self._done:
            return []
        started = time.perf_counter()
        try:
            new = next(self._steps)
        except BaseException:
            self.close()
            raise
        elapsed = time.perf_counter() - started
        if self.tokens or self.stats.prefill_s:
            self.stats.decode_s += elapsed
        else:
            self.stats.prefill_s = elapsed
        new = new[: self.params.max_new_tokens - len(self.tokens)]
        if self.params.stop_at_eos:
            for i, token in enumerate(new):
                if token in self.params.eos_token_ids:
                    new = new[: i + 1]
                    self._done = True
                    break
        self.tokens += new
        self.stats.new_tokens = len(self.tokens)
        if len(self.tokens) >= self.params.max_new_tokens:
            self._done = True
        if self._done:
            self.close()
        return new

    def __iter__(self) -> Iterator[list[int]]:
        while not self.is_done():
            yield self.generate_next_token()


def checked(model: Model, params: GeneratorParams, prompt: list[int]) -> GeneratorParams:
    """`params` with the artifact's defaults filled in, checked against the model and the prompt's token ids."""
    params = replace(params, tree=params.tree or model.tree,
                     eos_token_ids=params.eos_token_ids or model.manifest.eos_token_ids)
    params.check(model, len(prompt))
    vocab = model.manifest.target.vocab_size
    if bad := [t for t in prompt if not (isinstance(t, (int, np.integer)) and 0 <= t < vocab)]:
        raise DovetailError(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {vocab}); encode text with "
                            "model.tokenizer")
    return params


def generate(model: Model, prompt: list[int], params: GeneratorParams) -> tuple[list[int], Stats]:
    generator = Generator(model, params, prompt)
    for _ in generator:
        pass
    return generator.tokens, generator.stats


def _reusable(model: Model, prompt: np.ndarray, caches: list[int]) -> int:
    """How many leading rows of the caches (holding `caches` rows each) stay valid for `prompt`.

    Target row i depends on tokens [0, i], drafter row i on [0, i + 1]: both hold for i < common prefix − 1.
    Keeping one token less than the common prefix also leaves the prefill at least one token, whose
    logits give the first new token and whose feature the drafter needs.
    """
    held = np.asarray(model.history[: len(prompt)], dtype=np.int64)
    differs = np.flatnonzero(held != prompt[: len(held)])
    common = differs[0] if len(differs) else len(held)
    return int(max(0, min(common - 1, *caches)))


def _speculative(model: Model, prompt: np.ndarray, params: GeneratorParams, stats: Stats) -> Iterator[list[int]]:
    target, drafter, tree_settings, sampling = model.target, model.drafter, params.tree, params.sampling
    rng = np.random.default_rng(sampling.seed)
    capacity = len(prompt) + params.max_new_tokens + tree_settings.total_tokens
    # A seed's draws follow the drafter's trees, and a quantized drafter's row may depend on the rows computed in the
    # same call: kept rows could change the draws, so sampling starts cold and a seed always repeats its output.
    caches = [target.cached, drafter.cached] if drafter else [target.cached]
    keep = _reusable(model, prompt, caches) if sampling.greedy else 0
    target.start(capacity, tree_settings.total_tokens, keep)
    if drafter:
        drafter.start(capacity, tree_settings, keep)
    model.history = prompt.tolist()
    stats.cached_tokens = keep

    logits, features = target.prefill(prompt[keep:])
    token = pick(logits[None], sampling, rng)
    model.history.append(token)
    yield [token]
    # A trained drafter reads (target feature of token i, token i+1): the prompt shifted by one; a draft model reads
    # the tokens themselves.
    next_tokens = np.append(prompt[keep + int(not drafter or drafter.reads_features) :], token)
    # Prompt lookup: a chain copied from the text so far, no deeper than the tree, competes with the drafter's
    # candidates for the tree's places by its odds of acceptance (in chain mode, or with no drafter, it is the whole
    # draft).
    chains = model.target.verify == "chain" or not drafter
    copier = Copier(min(tree_settings.total_tokens - 1, tree_settings.depth)) if params.lookup else None
    while True:
        t0, drafted = time.perf_counter(), drafter.forwards if drafter else 0
        copied = copier.propose(np.asarray(model.history)) if copier else None
        if chains and copied is not None and len(copied[0]) or not drafter:
            # The copy is the whole chain (with no copy and no drafter, the step verifies its root alone): the
            # drafter reads these accepted tokens later, with the next ones.
            tree, first_copied = Tree(next_tokens[-1:], np.array([-1])).graft(copied[0])
            pending = (features, next_tokens) if drafter else None
        else:
            tree, first_copied = drafter.propose(features, next_tokens, tree_settings.total_tokens, copied)
            pending = None
        t1 = time.perf_counter()
        logits, hidden = target.forward(tree.tokens, target.kv.length + tree.depth, tree.mask())
        t2 = time.perf_counter()
        if sampling.greedy:
            path, bonus = accept_greedy(tree, logits.argmax(axis=-1))
        else:
            path, bonus = accept_sampled(tree, sampling.probs(logits), rng)
        target.kv.keep(np.asarray(path))
        emitted = np.append(tree.tokens[path[1:]], bonus)
        if copier:
            copier.update(emitted)
        features, next_tokens = hidden[path].copy(), emitted
        if pending:
            features, next_tokens = np.concatenate((pending[0], features)), np.concatenate((pending[1], emitted))
        stats.draft_s += t1 - t0
        stats.draft_forwards += drafter.forwards - drafted if drafter else 0
        stats.verify_s += t2 - t1
        stats.target_forwards += 1
        stats.accepted.append(len(path))
        stats.accepted_copied += sum(node >= first_copied for node in path[1:])
        new = emitted.tolist()
        model.history += new
        yield new


def _target_only(model: Model, prompt: np.ndarray, params: GeneratorParams, stats: Stats) -> Iterator[list[int]]:
    """Plain decoding through the same target graph: the baseline for tests and benchmarks."""
    target, sampling = model.target, params.sampling
    rng = np.random.default_rng(sampling.seed)
    keep = _reusable(model, prompt, [target.cached])
    target.start(len(prompt) + params.max_new_tokens, 1, keep)
    if model.drafter:
        model.drafter.forget()
    model.history = prompt.tolist()
    stats.cached_tokens = keep
    logits, _ = target.prefill(prompt[keep:])
    token = pick(logits[None], sampling, rng)
    model.history.append(token)
    yield [token]
    visible, first = np.zeros((1, 1, 1, 1), dtype=np.float32), np.arange(1)
    while True:
        t0 = time.perf_counter()
        logits, _ = target.forward(np.array([token]), np.array([target.kv.length]), visible)
        target.kv.keep(first)
        token = pick(logits, sampling, rng)
        stats.verify_s += time.perf_counter() - t0
        stats.target_forwards += 1
        model.history.append(token)
        yield [token]


def pick(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator) -> int:
    """The target's own next token from one row of logits: argmax, or a draw from its distribution."""
    if sampling.greedy:
        return int(logits[0].argmax())
    p = sampling.probs(logits)[0]
    return int(rng.choice(len(p), p=p))
