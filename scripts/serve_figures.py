"""The serving figures of docs/benchmarks.md: time to first token on a conversation's 3rd turn (caches reused vs cold), server
tok/s vs generate's on the same prompts, and a bounded load run against `dovetail-onnx serve`.

    python scripts/serve_figures.py artifacts/smollm2-135m-instruct ../shared/data/alpaca.jsonl --threads 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from dovetail_onnx.runtime import GeneratorParams, Model, generate

parser = argparse.ArgumentParser()
parser.add_argument("artifact", type=Path)
parser.add_argument("prompts", type=Path)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--port", type=int, default=8765)
args = parser.parse_args()
prompts = [json.loads(line)["turns"][0] for line in args.prompts.read_text().splitlines()[:20]]
TOKENS = 64


def third_turn(model: Model) -> dict:
    """Five conversations of alpaca prompts; turn 3 run right after turn 2 (reused) and after an unrelated prompt."""
    params = GeneratorParams(max_new_tokens=TOKENS)
    rows = []
    for c in range(5):
        messages = []
        for turn in range(3):
            messages.append({"role": "user", "content": prompts[3 * c + turn]})
            tokens, stats = generate(model, model.tokenizer.chat(messages), params)
            if turn < 2:
                messages.append({"role": "assistant", "content": model.tokenizer.decode(tokens)})
        generate(model, model.tokenizer.encode("unrelated", add_special_tokens=False), GeneratorParams(max_new_tokens=1))
        cold, cold_stats = generate(model, model.tokenizer.chat(messages), params)
        assert cold == tokens and cold_stats.cached_tokens == 0
        rows.append((stats.prefill_s, cold_stats.prefill_s, stats.cached_tokens, len(model.tokenizer.chat(messages))))
    return {"ttft_reused_ms": round(1000 * statistics.median(r[0] for r in rows), 1),
            "ttft_cold_ms": round(1000 * statistics.median(r[1] for r in rows), 1),
            "turn3_prompt_tokens": [r[3] for r in rows], "turn3_cached_tokens": [r[2] for r in rows],
            "identical": True}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    model = Model(args.artifact, threads=args.threads)
    figures = third_turn(model)
    params = GeneratorParams(max_new_tokens=TOKENS, stop_at_eos=False)
    expected, spent = [], 0.0
    for text in prompts:
        started = time.perf_counter()
        tokens, _ = generate(model, model.encode_prompt(text), params)
        spent += time.perf_counter() - started
        expected.append(model.tokenizer.decode(tokens))
    figures["generate_tok_s"] = round(TOKENS * len(prompts) / spent, 2)
    del model

    server = subprocess.Popen([sys.executable, "-m", "dovetail_onnx.cli.main", "serve", str(args.artifact), "--port",
                               str(args.port), "--threads", str(args.threads), "--max-queue", "4"],
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(i: int, max_tokens: int = TOKENS) -> str:
            out = client.chat.completions.create(messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                                                 model=args.artifact.name, max_tokens=max_tokens, temperature=0,
                                                 extra_body={"ignore_eos": True})
            return out.choices[0].message.content

        started = time.perf_counter()
        answers = [ask(i) for i in range(len(prompts))]
        figures["server_tok_s"] = round(TOKENS * len(prompts) / (time.perf_counter() - started), 2)
        figures["server_identical"] = answers == expected
        figures["server_over_generate"] = round(figures["server_tok_s"] / figures["generate_tok_s"], 3)

        rss_before = rss_mb(server.pid)

        def client_loop(c: int) -> list[str]:
            results = []
            for i in range(c, 200, 8):
                try:
                    results.append("ok" if ask(i, 16) == expected_short[i % len(prompts)] else "wrong")
                except openai.RateLimitError:
                    results.append("429")
            return results

        expected_short = [ask(i, 16) for i in range(len(prompts))]
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            outcomes = [r for rs in pool.map(client_loop, range(8)) for r in rs]
        figures["load"] = {"requests": len(outcomes), "answered_correctly": outcomes.count("ok"),
                           "refused_429": outcomes.count("429"), "wrong": outcomes.count("wrong"),
                           "wall_s": round(time.perf_counter() - started, 1), "max_queue": 4,
                           "rss_mb_before": rss_before, "rss_mb_after": rss_mb(server.pid)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(figures, indent=1))


main()
