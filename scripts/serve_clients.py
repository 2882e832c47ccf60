"""The continuous-batching figures of docs/benchmarks.md ("Serving"): one `dovetail-onnx serve`, the same chat
requests sent first by one client, then by several at once; aggregate completion tok/s, latency percentiles, and
whether every answer equals the one-client answer.

    python scripts/serve_clients.py artifacts/smollm2-135m-instruct-gguf ../shared/data/alpaca.jsonl --threads 2
    python scripts/serve_clients.py ARTIFACT PROMPTS --threads 1 -- --ray --replicas 2    # extra serve options
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

parser = argparse.ArgumentParser()
parser.add_argument("artifact", type=Path)
parser.add_argument("prompts", type=Path)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--port", type=int, default=8766)
parser.add_argument("--first", type=int, default=40, help="the first prompt used (0-based)")
parser.add_argument("--n", type=int, default=16)
parser.add_argument("--max-tokens", type=int, default=64)
parser.add_argument("--clients", type=int, default=4)
parser.add_argument("serve_options", nargs="*", help="more `serve` options, after --")
args = parser.parse_args()
lines = args.prompts.read_text().splitlines()[args.first : args.first + args.n]
prompts = [json.loads(line)["turns"][0] for line in lines]


def main() -> None:
    command = [sys.executable, "-m", "dovetail_onnx.cli.main", "serve", str(args.artifact), "--port", str(args.port),
               "--threads", str(args.threads), *args.serve_options]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(1800):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(text: str) -> tuple[str, int, float]:
            started = time.perf_counter()
            out = client.chat.completions.create(model=args.artifact.resolve().name, max_tokens=args.max_tokens,
                                                 temperature=0, messages=[{"role": "user", "content": text}])
            return out.choices[0].message.content, out.usage.completion_tokens, time.perf_counter() - started

        ask(prompts[0])  # warm-up
        figures, answers = {}, {}
        for clients in (1, args.clients):
            started = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, prompts))
            wall = time.perf_counter() - started
            latency = sorted(r[2] for r in results)
            answers[clients] = [r[0] for r in results]
            figures[f"{clients} clients"] = {
                "tok_s": round(sum(r[1] for r in results) / wall, 1),
                "p50_s": round(statistics.median(latency), 2),
                "p90_s": round(latency[max(0, int(0.9 * len(latency)) - 1)], 2)}
        figures["ratio"] = round(figures[f"{args.clients} clients"]["tok_s"] / figures["1 clients"]["tok_s"], 2)
        figures["identical"] = f"{sum(a == b for a, b in zip(answers[1], answers[args.clients]))}/{len(prompts)}"
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps(figures, indent=1))


main()
