"""Sampling: tree acceptance keeps the target's distribution exactly; bad values are refused."""
from __future__ import annotations

import numpy as np
import pytest

from dovetail_onnx.runtime import GeneratorParams, SamplingParams, generate
from dovetail_onnx.runtime.tree import Tree
from dovetail_onnx.runtime.verify import accept_sampled
from clirun import fails


def test_acceptance_reproduces_the_target_distribution():
    """Root with three proposals, one with a child: the first two emitted tokens follow p exactly."""
    rng = np.random.default_rng(0)
    vocab, draws = 5, 40_000
    probs = rng.dirichlet(np.ones(vocab), size=4)  # the target's distribution after the root and nodes 1..3
    likely = np.argsort(-probs[0])
    # Node 1 and node 2 propose the two likeliest first tokens; node 3, under node 1, the likeliest after it.
    tree = Tree(np.array([0, likely[0], likely[1], probs[1].argmax()]), np.array([-1, 0, 0, 1]))
    first, second = np.zeros(vocab), np.zeros(vocab)
    for _ in range(draws):
        path, bonus = accept_sampled(tree, probs, rng)
        emitted = [int(tree.tokens[n]) for n in path[1:]] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == likely[0]:  # only node 1 can emit it: a rejected proposal is removed from p
            second[emitted[1]] += 1
    np.testing.assert_allclose(first / draws, probs[0], atol=0.01)
    np.testing.assert_allclose(second / second.sum(), probs[1], atol=0.02)


def test_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    np.testing.assert_allclose(SamplingParams(1.0, top_k=2).probs(logits)[0], [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(SamplingParams(1.0, top_p=0.75).probs(logits)[0], [0.625, 0.375, 0, 0])
    np.testing.assert_allclose(SamplingParams(1.0, top_p=0.81).probs(logits)[0], [0.5, 0.3, 0.15, 0] / np.float64(0.95))


@pytest.mark.parametrize("mode", ["speculative", "target-only"])
def test_top_1_sampling_is_greedy(mode, models, references):
    """Through the sampling path (rejections and residual draws), a one-token support must give greedy output."""
    model = models["llama"]
    prompt = model.encode_prompt("sampled", raw=True)
    params = GeneratorParams(max_new_tokens=40, mode=mode, stop_at_eos=False, sampling=SamplingParams(0.7, top_k=1, seed=3))
    tokens, _ = generate(model, prompt, params)
    assert tokens == references("llama", prompt, 40)


def test_seed_reproduces_and_temperature_varies(models):
    model = models["qwen2"]
    prompt = model.encode_prompt("vary", raw=True)

    def run(seed):
        return generate(model, prompt, GeneratorParams(max_new_tokens=30, stop_at_eos=False,
                                                       sampling=SamplingParams(1.0, seed=seed)))[0]

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("args,match", [(["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"),
                                        (["--top-p", "1.5"], "--top-p"), (["--sample-top-k", "-2"], "--sample-top-k")])
def test_bad_sampling_values(args, match, artifacts):
    fails(["generate", str(artifacts["llama"]), "--prompt", "hi", *args], match, code=2)
