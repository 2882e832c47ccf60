"""`dovetail-onnx serve` (an OpenAI-compatible HTTP server) and `dovetail-onnx chat` (a terminal chat)."""
from __future__ import annotations

from pathlib import Path

import click

from dovetail_onnx.cli.command import Command
from dovetail_onnx.cli.options import SEED, FiniteFloat, Threads
from dovetail_onnx.runtime import Generator, GeneratorParams, Model, SamplingParams, Stats
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.manifest import load_manifest
from dovetail_onnx.runtime.sessions import DEVICES
from dovetail_onnx.runtime.tokenizer import StreamDecoder

artifact_argument = click.argument("artifact", type=click.Path(path_type=Path))
draft_device_option = click.option("--draft-device", type=click.Choice(DEVICES), default="auto",
                                   show_default=True)
threads_option = click.option("--threads", type=Threads(),
                              help="Intra-op threads per session, at most the cores [default: ONNX Runtime's choice].")


@click.command(cls=Command)
@artifact_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all interfaces).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-queue", type=click.IntRange(min=0), default=16, show_default=True,
              help="Requests that may wait while others generate; past that they get HTTP 429.")
@click.option("--max-batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests that generate together, one target forward a step for all (where the artifact batches "
                   "exactly: dovetail's kernels); 1 runs one at a time.")
@click.option("--api-key", envvar="DOVETAIL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every route but /health [env: DOVETAIL_API_KEY].")
@click.option("--ray", "on_ray", is_flag=True,
              help="Run the app as a Ray Serve deployment of --replicas replicas (the `ray` extra).")
@click.option("--replicas", type=click.IntRange(1), default=2, show_default=True, help="Ray Serve replicas.")
@click.option("--ray-address", help="An existing Ray cluster to run on [default: a local Ray instance].")
@draft_device_option
@threads_option
def serve(artifact, host, port, max_queue, max_batch, api_key, on_ray, replicas, ray_address, draft_device, threads):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:
        import uvicorn

        from dovetail_onnx.serve.app import create_app
        from dovetail_onnx.runtime.batch import batchable
    except ImportError:
        raise DovetailError("serve needs FastAPI and uvicorn: pip install 'dovetail-onnx[serve]'") from None
    if on_ray:
        from dovetail_onnx.serve.replicas import serve_replicas

        load_manifest(artifact)  # a bad artifact fails here in one line, not in every replica
        name = Path(artifact).resolve().name
        click.echo(f"serving {name} on http://{host}:{port}/v1 through Ray Serve, {replicas} replicas", err=True)
        serve_replicas(Path(artifact).resolve(), name, host, port, replicas, ray_address, max_queue, max_batch,
                       api_key, draft_device, threads)
        return
    model = Model(artifact, draft_device=draft_device, threads=threads)
    name = model.manifest.folder.resolve().name
    why = batchable(model)
    batching = f"up to {max_batch} requests at once" if max_batch > 1 and not why else \
        f"one request at a time{f' ({why})' if max_batch > 1 else ''}"
    click.echo(f"serving {name} on http://{host}:{port}/v1, {batching} (draft on {model.draft_provider})", err=True)
    uvicorn.run(create_app(model, name, max_queue, api_key, max_batch), host=host, port=port, log_level="info")


@click.command(cls=Command)
@artifact_argument
@click.option("--system", help="A system message to start the conversation with.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True, help="Longest reply.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=FiniteFloat(0, 1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass.")
@click.option("--seed", type=SEED, help="Sampling seed.")
@draft_device_option
@threads_option
def chat(artifact, system, max_new_tokens, temperature, top_p, seed, draft_device, threads):
    """Chat with ARTIFACT in the terminal. /reset starts over, /stats describes the last reply, Ctrl-C stops a
    reply, Ctrl-D quits. Each turn reuses the caches of the last, so only the new message is prefilled."""
    sampling = SamplingParams(temperature, top_p, 0, seed)
    sampling.check()
    model = Model(artifact, draft_device=draft_device, threads=threads)
    opening = [{"role": "system", "content": system}] if system else []
    messages, last = list(opening), None
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            continue
        if line.strip() == "/reset":
            messages = list(opening)
            click.echo("(a new conversation)")
        elif line.strip() == "/stats":
            click.echo(describe(last, model) if last else "(no reply yet)")
        elif line.strip():
            messages.append({"role": "user", "content": line})
            last = reply(model, messages, max_new_tokens, sampling)


def reply(model: Model, messages: list[dict], max_new_tokens: int, sampling: SamplingParams) -> Stats | None:
    """Stream the assistant's answer to `messages` and append it; Ctrl-C ends it early (what was shown stays)."""
    prompt = model.tokenizer.chat(messages)
    room = model.manifest.context_length - len(prompt)
    if room < 1:
        messages.pop()
        click.echo(f"(the conversation fills the model's context of {model.manifest.context_length} tokens; /reset)")
        return None
    generator = Generator(model, GeneratorParams(min(max_new_tokens, room), sampling=sampling), prompt)
    stream, text = StreamDecoder(model.tokenizer), ""
    try:
        for new in generator:
            piece = stream.push(new)
            text += piece
            click.echo(piece, nl=False)
        rest = stream.flush()
        text += rest
        click.echo(rest)
    except KeyboardInterrupt:
        generator.close()
        click.echo(" [stopped]")
    messages.append({"role": "assistant", "content": text})
    return generator.stats


def describe(stats: Stats, model: Model) -> str:
    return (f"{stats.new_tokens} tokens, time to first token {stats.prefill_s * 1000:.0f} ms "
            f"({stats.cached_tokens} prompt tokens reused from the last turn), {stats.mean_accepted:.2f} tokens per "
            f"target forward, {stats.tokens_per_s:.1f} tok/s, draft on {model.draft_provider}")
