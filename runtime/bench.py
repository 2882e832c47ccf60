"""`dovetail-onnx bench`: speculative vs target-only on Spec-Bench-style prompts, same graph, same threads."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.generator import GeneratorParams, Model, Stats, generate
from dovetail_onnx.runtime.manifest import EXPORT_QUANTIZED_TREE, MANIFEST, Manifest, TreeSettings
from dovetail_onnx.runtime.tokenizer import decode_utf8
from dovetail_onnx.runtime.tree import causal


def load_prompts(path: Path, n: int | None) -> tuple[list[str], list[str]]:
    """`turns[0]` and `category` (or "(none)") of each JSON line (`{"question_id", "category", "turns": [...]}`)."""
    if not path.is_file():
        raise DovetailError(f"prompt file {path} does not exist")
    try:
        text = decode_utf8(path.read_bytes(), f"prompt file {path}")
    except OSError as exc:
        raise DovetailError(f"cannot read prompt file {path} ({exc.strerror or exc})") from exc
    prompts, categories = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["turns"][0]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise DovetailError(f"{path}:{number} is not a Spec-Bench line with a 'turns' list ({exc})") from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise DovetailError(f"{path}:{number}: turns[0] is not a non-empty string")
        prompts.append(prompt)
        categories.append(str(row.get("category") or "(none)"))
    if not prompts:
        raise DovetailError(f"{path} holds no prompts")
    return prompts[:n], categories[:n]


@dataclass
class Totals:
    """Decode-only sums: the prefill is the same work in both modes and is left out."""

    tokens: int = 0
    forwards: int = 0
    decode_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    copied: int = 0  # accepted tokens that came from prompt lookup
    draft_forwards: int = 0

    def add(self, stats: Stats) -> None:
        self.tokens += stats.new_tokens - 1
        self.forwards += stats.target_forwards
        self.decode_s += stats.decode_s
        self.draft_s += stats.draft_s
        self.verify_s += stats.verify_s
        self.copied += stats.accepted_copied
        self.draft_forwards += stats.draft_forwards

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class Result:
    tree: TreeSettings
    speculative: Totals = field(default_factory=Totals)
    identical: int = 0
    per_prompt: list[dict] = field(default_factory=list)
    stats: list[Stats] = field(default_factory=list)

    def summary(self, baseline: Totals, prompts: int) -> dict:
        spec = self.speculative
        steps = max(spec.forwards, 1)
        return {
            "top_k": self.tree.top_k, "depth": self.tree.depth, "tree_tokens": self.tree.total_tokens,
            "min_prob": self.tree.min_prob, "sizing": "cost" if self.tree.step_ms else "fixed",
            "mean_accepted": round(spec.tokens / steps, 3),
            "copied_per_step": round(spec.copied / steps, 3),
            "draft_forwards_per_step": round(spec.draft_forwards / steps, 2),
            "tokens_per_s": round(spec.tokens_per_s, 2),
            "baseline_tokens_per_s": round(baseline.tokens_per_s, 2),
            "speedup": round(spec.tokens_per_s / baseline.tokens_per_s, 3) if baseline.tokens_per_s else 0.0,
            "identical": self.identical == prompts,
            "identical_count": self.identical,
            "ms_per_step": {"draft": round(1000 * spec.draft_s / steps, 2), "verify": round(1000 * spec.verify_s / steps, 2),
                            "host": round(1000 * (spec.decode_s - spec.draft_s - spec.verify_s) / steps, 2)},
        }


def by_category(bench: Bench, categories: list[str]) -> dict[str, list[dict]]:
    """Each category's τ and speeds per tree setting, for a prompt file that mixes categories."""
    out = {}
    for category in sorted(set(categories)):
        rows = [i for i, c in enumerate(categories) if c == category]
        baseline = Totals()
        for i in rows:
            baseline.add(bench.baseline_per_prompt[i])
        out[category] = []
        for result in bench.results:
            part = Result(result.tree, identical=sum(result.per_prompt[i]["identical"] for i in rows))
            for i in rows:
                part.speculative.add(result.stats[i])
            out[category].append(part.summary(baseline, len(rows)))
    return out


class Genai:
    """onnxruntime-genai on a model folder, greedy, on the CPU with our thread count: the bar we measure against."""

    def __init__(self, folder: Path, threads: int | None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise DovetailError("--baseline-genai needs onnxruntime-genai: pip install onnxruntime-genai-cuda==0.18.0 "
                                "(the -cuda build installs beside onnxruntime-gpu)") from None
        if not (folder / "genai_config.json").is_file():
            raise DovetailError(f"{folder} has no genai_config.json; build one with "
                                "`python -m onnxruntime_genai.models.builder -i HF_FOLDER -o DIR -p fp32 -e cpu`")
        config = og.Config(str(folder))
        config.clear_providers()
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og, self.model = og, og.Model(config)

    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """New tokens (up to EOS) and the decode time, which starts after the first new token as ours does."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + max_new_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(prompt)
        tokens, started = [], 0.0
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            started = started or time.perf_counter()
        return tokens, time.perf_counter() - started


@dataclass
class Bench:
    baseline: Totals = field(default_factory=Totals)  # our target-only decoding
    baseline_per_prompt: list[Stats] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)  # speculative, one per tree setting
    genai: Totals | None = None
    genai_identical: int = 0  # prompts where genai's tokens equal our target-only tokens


def run_bench(model: Model, prompts: list[str], max_new_tokens: int, trees: list[TreeSettings],
              genai: Genai | None = None, progress=lambda: None, lookup: bool = True) -> Bench:
    """Each prompt: target-only once, speculative once per tree setting (outputs must match), genai once.

    Runs are interleaved prompt by prompt so that drift in the machine's speed hits every system alike.
    """
    warm = model.encode_prompt(prompts[0])
    for tree in trees:
        generate(model, warm, GeneratorParams(max_new_tokens=8, tree=tree))
    bench = Bench(results=[Result(tree) for tree in trees], genai=Totals() if genai else None)
    if genai:
        genai.generate(warm, 8)
    for text in prompts:
        prompt = model.encode_prompt(text)
        expected, stats = generate(model, prompt, GeneratorParams(max_new_tokens, mode="target-only"))
        bench.baseline.add(stats)
        bench.baseline_per_prompt.append(stats)
        for result in bench.results:
            tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens, tree=result.tree, lookup=lookup))
            result.speculative.add(stats)
            result.identical += tokens == expected
            result.per_prompt.append({"prompt_tokens": len(prompt), **stats.as_dict(), "identical": tokens == expected})
            result.stats.append(stats)
        if genai:
            tokens, seconds = genai.generate(prompt, max_new_tokens)
            bench.genai.tokens += len(tokens) - 1
            bench.genai.forwards += len(tokens) - 1
            bench.genai.decode_s += seconds
            bench.genai_identical += tokens == expected
        progress()
    return bench


def agreement(model: Model, reference: Model, prompts: list[str], max_new_tokens: int,
              progress=lambda: None) -> list[tuple[int, bool]]:
    """Per prompt: how many greedy target-only tokens of `model` equal `reference`'s before the first difference,
    and whether the outputs are identical. The price of a quantized target, measured against the fp32 one."""
    rows = []
    for text in prompts:
        params = GeneratorParams(max_new_tokens, mode="target-only")
        ours, _ = generate(model, model.encode_prompt(text), params)
        theirs, _ = generate(reference, reference.encode_prompt(text), params)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        rows.append((same, ours == theirs))
        progress()
    return rows


def profile(model: Model, prompt: list[int], contexts: list[int], rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
            repeats: int = 30) -> dict:
    """Target ms per forward (median of `repeats`) by rows S at each context P, and drafter ms per forward (one
    tree level).

    Row counts take turns in rounds of two timed forwards each, after one untimed forward that takes the change of
    shape: timed one row count after another, the first ones measured slower on a VM whose speed drifts (a lone
    row slower than two). A round takes about 0.2 s and such a VM drifts for seconds at a time, so the medians
    take 15 rounds: with 5, two runs on one int8 artifact read 8 rows at 1.14x and 1.60x one row. The target's K/V
    rows hold no real tokens while timing, so its cache is emptied afterwards: the next generation must not reuse
    them.
    """
    target, rng = model.target, np.random.default_rng(0)
    target.start(max(contexts) + max(rows), max(rows))
    by_rows = {}
    for past in contexts:
        times: dict[int, list[float]] = {seq: [] for seq in rows}
        for _ in range(-(-repeats // 2)):
            for seq in rows:
                for timed in (False, True, True):
                    target.kv.length = past
                    started = time.perf_counter()
                    target.forward(rng.integers(0, model.manifest.target.vocab_size, seq), past + np.arange(seq),
                                   causal(seq))
                    if timed:
                        times[seq].append(time.perf_counter() - started)
        by_rows[past] = {seq: round(1000 * float(np.median(t)), 2) for seq, t in times.items()}
    target.kv.length = 0
    _, stats = generate(model, prompt, GeneratorParams(64, tree=replace(model.tree, step_ms=())))
    draft_ms = 1000 * stats.draft_s / max(stats.draft_forwards, 1)
    steps = max(stats.target_forwards, 1)
    return {"target_ms": by_rows, "drafter_ms_per_forward": round(draft_ms, 2),
            "draft_and_host_ms_per_step": round(1000 * (stats.decode_s - stats.verify_s) / steps, 2)}


def step_costs(model: Model, prompt: list[int], context: int, sizes: int) -> tuple[float, ...]:
    """ms of one step by tree size 1..`sizes` on this machine, for `TreeSettings.step_ms`: the target forward over
    that many rows at `context` tokens, plus a step's drafting and host work (measured with the artifact's tree)."""
    timed = profile(model, prompt, [context], tuple(range(1, sizes + 1)), repeats=8)
    overhead = timed["draft_and_host_ms_per_step"]
    return tuple(round(ms + overhead, 2) for ms in timed["target_ms"][context].values())


def store_tree(manifest: Manifest, tree: TreeSettings) -> dict:
    """Write `tree` as the artifact's default: the tree that pays depends on the machine's verify cost curve."""
    path = manifest.folder / MANIFEST
    raw = json.loads(path.read_text())
    raw["tree"] = asdict(tree)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(raw, indent=2) + "\n")
    partial.replace(path)
    return raw["tree"]


# Prompts of our own for `export --tune` (the benchmark sets are kept for measuring).
TUNING_PROMPTS = [
    "Explain in a few sentences how a refrigerator keeps food cold.",
    "Write a short email asking a colleague to move our meeting to Thursday.",
    "List five tips for learning a new language.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "What are the main differences between a virus and a bacterium?",
]


def tuning_trees(model: Model, step_ms: tuple[float, ...]) -> list[TreeSettings]:
    """Candidate trees around what pays on CPUs: sizes for tree-verifying targets, chain depths for quantized ones
    (and a wider first level at a chain's rows where the graph that runs verifies trees) and for prompt lookup
    alone, each fixed and (with a drafter) each sized step by step from `step_ms`."""
    manifest, d = model.manifest, model.manifest.tree
    # Prompt lookup alone proposes its copy whole: no sizing, and a longer copy costs no drafting.
    if not (manifest.drafter or manifest.draft_model):
        return [TreeSettings(1, depth, depth + 1, d.min_prob) for depth in (1, 2, 4, 6, 8)]
    if manifest.target.verify == "chain":
        fixed = [TreeSettings(1, depth, depth + 1, d.min_prob) for depth in (1, 2, 3, 4)]
        if model.target.verify == "tree":
            wide = EXPORT_QUANTIZED_TREE
            fixed += [TreeSettings(wide.top_k, wide.depth, tokens, d.min_prob) for tokens in (4, 6)]
    else:
        fixed = [TreeSettings(d.top_k, d.depth, tokens, d.min_prob) for tokens in (4, 6, 8, 12, 16)]
    return fixed + [replace(fixed[-1], step_ms=step_ms)]


def tune_tree(model: Model, max_new_tokens: int = 64, progress=lambda: None) -> tuple[TreeSettings, dict]:
    """Measure this machine's step cost by tree size, run the candidate trees on TUNING_PROMPTS and store the
    fastest as the artifact's default; return it with its summary (speedup over target-only, τ)."""
    prompt = model.encode_prompt(TUNING_PROMPTS[0])
    step_ms = step_costs(model, prompt, len(prompt) + max_new_tokens // 2, 16) if model.drafter else ()
    run = run_bench(model, TUNING_PROMPTS, max_new_tokens, tuning_trees(model, step_ms), progress=progress)
    best = max(run.results, key=lambda r: r.speculative.tokens_per_s)
    store_tree(model.manifest, best.tree)
    return best.tree, best.summary(run.baseline, len(TUNING_PROMPTS))
