"""`dovetail-onnx`: export, generate (and the commands users need around them)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from dovetail_onnx.cli.command import Command, Group, show_notes
from dovetail_onnx.cli.options import DEPTH, MIN_PROB, SEED, TOP_K, TREE_TOKENS, FiniteFloat, Threads, read_text
from dovetail_onnx.cli.serve import chat, serve
from dovetail_onnx.cli.train import train
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.manifest import BLOCK_SIZES, DEFAULT_BLOCK_SIZES, EXPORT_QUANTIZED_TREE, EXPORT_TREE, \
    MAX_TOP_K, PRECISIONS, SIZINGS, TreeSettings, export_tree
from dovetail_onnx.runtime.sessions import DEVICES


@click.group(cls=Group)
@click.version_option(package_name="dovetail-onnx")
def main() -> None:
    """Lossless speculative decoding: target LLM on the CPU, DGF drafter on the GPU, all in ONNX Runtime."""
    show_notes()


def default_name(target: str) -> str:
    """A file's name without its suffix, a folder's name, an embedded name as it is (qwen2.5-coder-… keeps its dot)."""
    path = Path(target)
    return path.stem if path.is_file() else path.name


@main.command(cls=Command)
@click.argument("target")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Artifact folder [default: artifacts/<target name>].")
@click.option("--drafter", default=None,
              help="Drafter folder (config.json + model.safetensors), a Dovetail/EAGLE pytorch_model.bin, 'random', or "
                   "'lookup' (no drafter: prompt lookup drafts alone) [default: the shipped drafter trained for "
                   "TARGET, else 'lookup'].")
@click.option("--draft-model", default=None,
              help="A small LM of TARGET's tokenizer (Hugging Face folder, .gguf file or embedded name) that drafts "
                   "instead of a trained drafter, e.g. a smaller size of the same family.")
@click.option("--drafter-layers", type=click.IntRange(1, 6), default=1, show_default=True,
              help="Layers of a random drafter.")
@click.option("--top-k", type=click.IntRange(1, MAX_TOP_K), default=None,
              help=f"Default tree top-k stored in the artifact [default: {EXPORT_TREE.top_k}; "
                   f"{EXPORT_QUANTIZED_TREE.top_k} for a quantized target, which verifies trees only on dovetail's "
                   "kernels and runs its default as a chain elsewhere].")
@click.option("--depth", type=DEPTH, default=None,
              help=f"Default tree depth [default: {EXPORT_TREE.depth}; {EXPORT_QUANTIZED_TREE.depth} for a quantized "
                   "target].")
@click.option("--tree-tokens", type=TREE_TOKENS, default=None,
              help=f"Default tree size, root included [default: {EXPORT_TREE.total_tokens}; depth + 1 for a "
                   "quantized target].")
@click.option("--min-prob", type=MIN_PROB, default=EXPORT_TREE.min_prob, show_default=True,
              help="Default least probability of a node's path for the drafter to expand it.")
@click.option("--draft-vocab", type=click.IntRange(min=0), default=None,
              help="Tokens the drafter head scores, most frequent first; 0 = all [default: the drafter's setting].")
@click.option("--cpu-drafter/--no-cpu-drafter", default=True, show_default=True,
              help="Also write a 4-bit drafter (MatMulNBits, and the same on dovetail's row kernel) for when it "
                   "runs on a CPU.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Target weights: fp32, int8/int4 MatMulNBits, or gguf: a GGUF target's own quantized blocks "
                   "(Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K) unchanged. A quantized target is its own model: speculative "
                   "output equals that artifact's target-only output.")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]),
              help="Weights per quantization scale of an int8/int4 target; larger runs faster, a little less like "
                   "fp32 [default: "
                   + ", ".join(f"{b} for {p}" for p, b in DEFAULT_BLOCK_SIZES.items() if p != "gguf") + "].")
@click.option("--tune", is_flag=True,
              help="Then time a few trees on this machine and store the fastest as the default (about a minute).")
@click.option("--threads", type=Threads(), help="Threads for --tune, at most the cores.")
def export(target, output, drafter, draft_model, drafter_layers, top_k, depth, tree_tokens, min_prob, draft_vocab,
           cpu_drafter, precision, block_size, tune, threads):
    """Export TARGET (a Hugging Face folder or a .gguf file) and a drafter to ONNX."""
    from dovetail_onnx.export.artifact import LOOKUP_DEPTH, export_artifact  # torch lives only on this path
    from dovetail_onnx.export.target import VERIFY

    output = output or Path("artifacts") / default_name(target)
    given = depth is not None
    tree = export_tree(VERIFY[precision], top_k, depth, tree_tokens, min_prob)
    export_artifact(target, output, drafter, drafter_layers, tree, draft_vocab, cpu_drafter, precision,
                    block_size=int(block_size) if block_size else None,
                    lookup_depth=tree.depth if given else LOOKUP_DEPTH, draft_model=draft_model)
    if tune:
        from rich.console import Console
        from rich.progress import Progress

        from dovetail_onnx.runtime import Model
        from dovetail_onnx.runtime.bench import TUNING_PROMPTS, tune_tree

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("timing trees on this machine", total=len(TUNING_PROMPTS))
            best, summary = tune_tree(Model(output, threads=threads), progress=lambda: bar.advance(task))
        click.echo(f"default tree for this machine: top_k {best.top_k}, depth {best.depth}, {best.total_tokens} tokens"
                   f"{', sized by cost' if best.step_ms else ''}: {summary['speedup']}x target-only's "
                   f"{summary['baseline_tokens_per_s']} tok/s, τ {summary['mean_accepted']} "
                   f"({len(TUNING_PROMPTS)} prompts of our own)", err=True)


@main.command(cls=Command)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Read the prompt from a UTF-8 file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--special-tokens", is_flag=True,
              help="Let special-token strings typed in the prompt (e.g. <|im_end|>) act as control tokens; by default "
                   "a chat message is plain text. --raw prompts always parse them.")
@click.option("--mode", type=click.Choice(["speculative", "target-only"]), default="speculative", show_default=True)
@click.option("--top-k", type=TOP_K, help="Tree top-k [default: the artifact's].")
@click.option("--depth", type=DEPTH, help="Tree depth [default: the artifact's].")
@click.option("--tree-tokens", type=TREE_TOKENS, help="Tree size, root included [default: the artifact's].")
@click.option("--min-prob", type=MIN_PROB,
              help="Least probability of a node's path for the drafter to expand it [default: the artifact's].")
@click.option("--sizing", type=click.Choice(SIZINGS),
              help="Tree size each step: 'cost' picks it from the artifact's measured step cost (`bench --tune`), "
                   "'fixed' is always --tree-tokens [default: the artifact's].")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass.")
@click.option("--sample-top-k", type=click.IntRange(min=0), default=0, show_default=True,
              help="Sample among the k likeliest (0 = all).")
@click.option("--seed", type=SEED, help="Sampling seed.")
@click.option("--ignore-eos", is_flag=True, help="Generate --max-new-tokens tokens even past an end-of-turn token.")
@click.option("--lookup/--no-lookup", default=True, show_default=True,
              help="Also draft by prompt lookup: tokens that followed the latest earlier occurrence of the last ones.")
@click.option("--draft-device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=Threads(), help="Intra-op threads per session, at most the cores [default: ONNX Runtime's choice].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate(artifact, prompt, prompt_file, max_new_tokens, raw, special_tokens, mode, top_k, depth, tree_tokens,
             min_prob, sizing, temperature, top_p, sample_top_k, seed, ignore_eos, lookup, draft_device, threads, as_json):
    """Generate from a prompt (--prompt, --prompt-file or stdin) with an exported ARTIFACT."""
    from dovetail_onnx.runtime import Generator, GeneratorParams, Model, SamplingParams
    from dovetail_onnx.runtime.tokenizer import StreamDecoder

    if prompt is not None and prompt_file is not None:
        raise DovetailError("both --prompt and --prompt-file given; pass one of them")
    if prompt is None:
        if prompt_file is None and sys.stdin.isatty():
            raise DovetailError("no prompt: pass --prompt TEXT, --prompt-file F, or pipe text on stdin")
        prompt = read_text(prompt_file)
    if not prompt.strip():
        raise DovetailError("the prompt is empty or only whitespace; pass some text with --prompt, --prompt-file or stdin")
    sampling = SamplingParams(temperature, top_p, sample_top_k, seed)
    model = Model(artifact, draft_device=draft_device, threads=threads)
    tree = model.tree
    overrides = (("top_k", top_k), ("depth", depth), ("total_tokens", tree_tokens), ("min_prob", min_prob))
    tree = sized_tree(replace(tree, **{k: v for k, v in overrides if v is not None}), sizing)
    params = GeneratorParams(max_new_tokens, mode, tree, stop_at_eos=not ignore_eos, sampling=sampling, lookup=lookup)
    generator = Generator(model, params, model.encode_prompt(prompt, raw, special_tokens))
    stream = StreamDecoder(model.tokenizer)
    for new in generator:
        piece = stream.push(new)
        if not as_json:
            click.echo(piece, nl=False)
    stats = {**generator.stats.as_dict(), "draft_provider": model.draft_provider,
             "draft_graph": model.draft_graph, "target_provider": model.target.session.get_providers()[0],
             "mode": mode}
    if as_json:
        click.echo(json.dumps({"text": model.tokenizer.decode(generator.tokens), "token_ids": generator.tokens,
                               "stats": stats}))
    else:
        click.echo(stream.flush())
        click.echo(f"[{stats['new_tokens']} tokens, {stats['mean_accepted']} per target forward, "
                   f"{stats['tokens_per_s']} tok/s, draft on {stats['draft_provider']}]", err=True)


def sized_tree(tree: TreeSettings, sizing: str | None) -> TreeSettings:
    """The artifact's `tree` sized as asked: 'fixed' drops its step cost, 'cost' needs the one `bench --tune` stored."""
    if sizing == "fixed":
        return replace(tree, step_ms=())
    if sizing == "cost" and not tree.step_ms:
        raise DovetailError("--sizing cost needs this machine's step cost in the artifact; measure it with "
                            "`dovetail-onnx bench ARTIFACT --prompts FILE --sizing cost --tune`")
    return tree


def number_list(kind: click.ParamType):
    """Callback for a comma list of numbers, each checked against `kind`'s range."""

    def convert(ctx, param, value: str | None) -> list | None:
        return None if value is None else [kind.convert(v.strip(), param, ctx) for v in value.split(",")]

    return convert


def choice_list(choices: tuple[str, ...]):
    """Callback for a comma list of words, each one of `choices`."""

    def convert(ctx, param, value: str | None) -> list | None:
        return None if value is None else [click.Choice(choices).convert(v.strip(), param, ctx) for v in value.split(",")]

    return convert


@main.command(cls=Command)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path),
              help="Spec-Bench JSONL (turns[0] is the user message; the chat template is applied) [default: six "
                   "prompts of our own, the ones export --tune runs].")
@click.option("--n", type=click.IntRange(min=1), help="Use the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--top-k", callback=number_list(TOP_K), help="Tree top-k, or a comma list to sweep [default: the artifact's].")
@click.option("--depth", callback=number_list(DEPTH), help="Tree depth, or a comma list to sweep.")
@click.option("--tree-tokens", callback=number_list(TREE_TOKENS), help="Tree size, or a comma list to sweep.")
@click.option("--min-prob", callback=number_list(MIN_PROB), help="Least path probability to expand, or a comma list.")
@click.option("--sizing", callback=choice_list(SIZINGS),
              help="Tree size each step: 'cost' picks it from the step cost measured at the start of this run, "
                   "'fixed' is always --tree-tokens; a comma list runs both [default: the artifact's].")
@click.option("--baseline-genai", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An onnxruntime-genai model folder to run on the same prompts, threads and budget, side by side.")
@click.option("--draft-device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=Threads(), help="Intra-op threads per session, at most the cores [default: ONNX Runtime's choice].")
@click.option("--lookup/--no-lookup", default=True, show_default=True, help="Also draft by prompt lookup.")
@click.option("--profile", "with_profile", is_flag=True,
              help="Also time one target forward by rows (1-32) at the prompts' mean context and at 2,000, and a "
                   "drafter forward.")
@click.option("--tune", is_flag=True,
              help="Store the fastest tree setting of this run as the artifact's default (in dovetail.json).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench(artifact, prompt_file, n, max_new_tokens, top_k, depth, tree_tokens, min_prob, sizing, baseline_genai,
          draft_device, threads, lookup, with_profile, tune, as_json):
    """Speculative vs target-only decoding speed on a prompt set, with exactness checked (and onnxruntime-genai's)."""
    import itertools

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from dovetail_onnx.runtime import Model
    from dovetail_onnx.runtime.bench import TUNING_PROMPTS, Genai, by_category, load_prompts, profile, run_bench, \
        step_costs, store_tree

    if prompt_file:
        prompts, categories = load_prompts(prompt_file, n)
    else:
        prompts = TUNING_PROMPTS[:n]
        categories = ["(none)"] * len(prompts)
    model = Model(artifact, draft_device=draft_device, threads=threads)
    genai = Genai(baseline_genai, threads) if baseline_genai else None
    d = model.tree
    trees = [TreeSettings(*setting) for setting in itertools.product(
        top_k or [d.top_k], depth or [d.depth], tree_tokens or [d.total_tokens], min_prob or [d.min_prob])]
    sizing, step_ms = sizing or ["cost" if d.step_ms else "fixed"], ()
    encoded = [model.encode_prompt(p) for p in prompts]
    mean = round(sum(map(len, encoded)) / len(encoded))
    if "cost" in sizing:
        step_ms = step_costs(model, encoded[0], mean + max_new_tokens // 2, max(t.total_tokens for t in trees))
    trees = [replace(tree, step_ms=step_ms if way == "cost" else ()) for tree in trees
             for way in sizing]
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"{len(prompts)} prompts × {len(trees) + 1 + bool(genai)} runs", total=len(prompts))
        run = run_bench(model, prompts, max_new_tokens, trees, genai, lambda: bar.advance(task), lookup)
    summaries = [r.summary(run.baseline, len(prompts)) for r in run.results]
    best = max(summaries, key=lambda s: s["speedup"])
    info = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "precision": model.manifest.target.precision,
            "step_ms": step_ms,
            "draft_provider": model.draft_provider, "draft_graph": model.draft_graph,
            "target_provider": model.target.session.get_providers()[0], "target_graph": model.target.graph.name}
    if run.genai:
        genai_speed = run.genai.tokens_per_s
        info["genai"] = {"tokens_per_s": round(genai_speed, 2),
                         "target_only_ratio": round(run.baseline.tokens_per_s / genai_speed, 3),
                         "best_speculative_ratio": round(best["tokens_per_s"] / genai_speed, 3),
                         "identical_to_target_only": run.genai_identical}
    if len(set(categories)) > 1:
        info["by_category"] = by_category(run, categories)
    if with_profile:
        info["profile"] = profile(model, encoded[0], sorted({mean, min(2000, model.manifest.context_length - 64)}))
    if tune:
        best_tree = TreeSettings(best["top_k"], best["depth"], best["tree_tokens"], best["min_prob"],
                                 step_ms if best["sizing"] == "cost" else ())
        info["tuned"] = store_tree(model.manifest, best_tree)
    if as_json:
        click.echo(json.dumps({**info, **best, "runs": summaries, "per_prompt": [r.per_prompt for r in run.results]}))
        return
    source = prompt_file.name if prompt_file else "our prompts"
    table = Table(title=f"{source}: {len(prompts)} prompts × {max_new_tokens} tokens, "
                        f"{info['precision']} target ({info['target_graph']}), draft on {info['draft_provider']}")
    for column in ("top_k", "depth", "tree", "min p", "sizing", "τ", "copied", "tok/s", "baseline tok/s", "speedup",
                   "identical", "draft ms", "drafts", "verify ms", "host ms"):
        table.add_column(column, justify="right")
    for s in summaries:
        step = s["ms_per_step"]
        table.add_row(*map(str, (s["top_k"], s["depth"], s["tree_tokens"], s["min_prob"], s["sizing"],
                                 s["mean_accepted"], s["copied_per_step"], s["tokens_per_s"], s["baseline_tokens_per_s"], s["speedup"],
                                 f"{s['identical_count']}/{len(prompts)}", step["draft"], s["draft_forwards_per_step"],
                                 step["verify"], step["host"])))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    if "by_category" in info:
        table = Table(title="by category")
        for column in ("category", "tree", "τ", "copied", "tok/s", "baseline tok/s", "speedup", "identical"):
            table.add_column(column, justify="right")
        for category, rows in info["by_category"].items():
            for s in rows:
                table.add_row(*map(str, (category, s["tree_tokens"], s["mean_accepted"], s["copied_per_step"],
                                         s["tokens_per_s"], s["baseline_tokens_per_s"], s["speedup"],
                                         s["identical_count"])))
        console.print(table)
    if with_profile:
        for past, times in info["profile"]["target_ms"].items():
            console.print(f"target ms per forward at {past} tokens of context: " +
                          ", ".join(f"{rows} rows {ms}" for rows, ms in times.items()))
        console.print(f"drafter ms per forward (one tree level): {info['profile']['drafter_ms_per_forward']}")
    if step_ms:
        console.print("ms a step by tree size (cost sizing): " + ", ".join(f"{i} {ms}" for i, ms in enumerate(step_ms, 1)))
    if tune:
        console.print(f"stored as the artifact's default tree: {info['tuned']}")
    if run.genai:
        g = info["genai"]
        console.print(f"onnxruntime-genai ({baseline_genai.name}): {g['tokens_per_s']} tok/s; target-only "
                      f"{g['target_only_ratio']}×, best speculative {g['best_speculative_ratio']}× of it; its tokens "
                      f"equal our target-only tokens on {g['identical_to_target_only']}/{len(prompts)} prompts")


@main.command(cls=Command)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("target")
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), required=True,
              help="Spec-Bench JSONL (turns[0] is the user message).")
@click.option("--n", type=click.IntRange(min=1), help="Use the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--mode", type=click.Choice(["speculative", "target-only"]), default="speculative", show_default=True)
def check(artifact, target, prompt_file, n, max_new_tokens, mode):
    """Compare ARTIFACT's greedy output with transformers' generate on TARGET (needs the export extras)."""
    from rich.console import Console
    from rich.progress import Progress

    from dovetail_onnx.export.check import check_against_transformers
    from dovetail_onnx.runtime.bench import load_prompts

    prompts, _ = load_prompts(prompt_file, n)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("comparing with transformers", total=len(prompts))
        rows = check_against_transformers(artifact, target, prompts, max_new_tokens, mode, lambda: bar.advance(task))
    same = sum(row["identical"] for row in rows)
    click.echo(f"{same}/{len(rows)} prompts identical to transformers' greedy output "
               f"({max_new_tokens} new tokens at most, {mode})")
    if same != len(rows):
        raise DovetailError(f"{len(rows) - same} prompts differ from transformers; re-export, or report the model")


@main.command(cls=Command)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("reference", type=click.Path(path_type=Path))
@click.option("--prompts", "prompt_file", type=click.Path(path_type=Path), required=True,
              help="Spec-Bench JSONL (turns[0] is the user message).")
@click.option("--n", type=click.IntRange(min=1), help="Use the first N prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--threads", type=Threads(), help="Intra-op threads per session, at most the cores.")
def compare(artifact, reference, prompt_file, n, max_new_tokens, threads):
    """How many greedy tokens of ARTIFACT match REFERENCE's (e.g. int4 against fp32) before they first differ."""
    from rich.console import Console
    from rich.progress import Progress

    from dovetail_onnx.runtime import Model
    from dovetail_onnx.runtime.bench import agreement, load_prompts

    prompts, _ = load_prompts(prompt_file, n)
    model, ref = Model(artifact, threads=threads), Model(reference, threads=threads)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"comparing with {reference.name}", total=len(prompts))
        rows = agreement(model, ref, prompts, max_new_tokens, lambda: bar.advance(task))
    matching = [same for same, _ in rows]
    click.echo(json.dumps({"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                           "mean_matching_tokens": round(sum(matching) / len(matching), 1),
                           "identical": sum(identical for _, identical in rows), "matching": matching}))


main.add_command(train)
main.add_command(serve)
main.add_command(chat)

if __name__ == "__main__":
    main()
