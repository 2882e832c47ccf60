"""Our artifact beside llama.cpp's `llama-server` on the same GGUF, the same prompts' token ids, one prompt at a time.

Every system runs prompt 1, then prompt 2, and so on, so drift in the machine's speed hits all alike. tok/s count
decode only (the first token excluded), as llama-server's `predicted_per_second` does. Needs a built llama-server
(docs/benchmarks.md, "Against llama.cpp, side by side"); runs on the deploy side only (no torch).

    python scripts/llama_cpp_side_by_side.py ARTIFACT FILE.gguf --prompts ../shared/data/code.jsonl -n 20 \
        --llama-server PATH/llama-server --threads 2 --json out.json
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import click

from dovetail_onnx.runtime import GeneratorParams, Model, generate
from dovetail_onnx.runtime.bench import load_prompts


@contextmanager
def llama_server(binary: Path, gguf: Path, port: int, threads: int, extra: list[str]):
    """A llama-server on localhost:port, up and answering; stopped on exit."""
    args = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", "1", "-c", "4096",
            "--port", str(port), *extra]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise click.ClickException(f"llama-server on port {port} did not come up")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait()


def complete(url: str, prompt: list[int], max_new_tokens: int) -> tuple[list[int], tuple[int, float]]:
    """Greedy completion of token ids: (new token ids, (decoded tokens, decode seconds) as the server reports them)."""
    body = {"prompt": prompt, "n_predict": max_new_tokens, "temperature": 0, "top_k": 1, "return_tokens": True,
            "cache_prompt": False, "samplers": ["top_k"]}
    request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.loads(reply.read())
    return answer["tokens"], (answer["timings"]["predicted_n"], answer["timings"]["predicted_ms"] / 1000)


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("-n", "count", type=int, default=20, show_default=True)
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--llama-server", "binary", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
def main(artifact, gguf, prompts, count, max_new_tokens, binary, threads, json_out):
    texts, _ = load_prompts(prompts, count)
    model = Model(artifact, threads=threads)
    ids = [model.encode_prompt(text) for text in texts]
    systems = ["llama.cpp plain", "llama.cpp n-gram", "ours target-only", "ours speculative"]
    totals = {name: [0, 0.0] for name in systems}  # decoded tokens, decode seconds

    def add(name: str, tokens: int, seconds: float) -> None:
        totals[name][0] += tokens
        totals[name][1] += seconds

    spec_tokens, spec_forwards, identical, llama_same = 0, 0, 0, 0
    generate(model, ids[0], GeneratorParams(8))
    for prompt in ids:
        # A llama-server left idle keeps its threads busy, so each runs only for its own prompt.
        with llama_server(binary, gguf, 18080, threads, []) as plain:
            complete(plain, prompt, 8)
            llama_tokens, timing = complete(plain, prompt, max_new_tokens)
        add("llama.cpp plain", *timing)
        with llama_server(binary, gguf, 18081, threads, ["--spec-type", "ngram-simple"]) as ngram:
            complete(ngram, prompt, 8)
            add("llama.cpp n-gram", *complete(ngram, prompt, max_new_tokens)[1])
        expected, stats = generate(model, prompt, GeneratorParams(max_new_tokens, mode="target-only"))
        add("ours target-only", stats.new_tokens - 1, stats.decode_s)
        tokens, stats = generate(model, prompt, GeneratorParams(max_new_tokens))
        add("ours speculative", stats.new_tokens - 1, stats.decode_s)
        spec_tokens += stats.new_tokens - 1
        spec_forwards += stats.target_forwards
        identical += tokens == expected
        llama_same += llama_tokens[: len(expected)] == expected[: len(llama_tokens)]
    means = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    base = means["llama.cpp plain"]
    result = {"prompts": len(ids), "max_new_tokens": max_new_tokens, "threads": threads,
              "tok_s": {name: round(value, 2) for name, value in means.items()},
              "vs_llama_plain": {name: round(value / base, 3) for name, value in means.items()},
              "tau": round(spec_tokens / max(spec_forwards, 1), 3),
              "speculative_identical_to_target_only": f"{identical}/{len(ids)}",
              "llama_cpp_same_tokens_as_ours": f"{llama_same}/{len(ids)}"}
    click.echo(json.dumps(result, indent=2))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
