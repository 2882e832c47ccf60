"""`dovetail-onnx train`: make the data from the target, train a drafter, save it (fp16, int8 or int4)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import click

from dovetail_onnx.cli.command import Command

DEFAULT_CACHE = Path.home() / ".cache" / "dovetail-onnx" / "train"


@click.command(cls=Command)
@click.argument("target")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Drafter folder to write (config.json + model.safetensors).")
@click.option("--fusion", type=click.Choice(["dgf", "eagle"]), default="dgf", show_default=True)
@click.option("--layers", type=click.IntRange(1, 6), default=1, show_default=True, help="Drafter decoder layers.")
@click.option("--intermediate-size", type=click.IntRange(0), default=0, show_default=True,
              help="Width of the drafter layers' MLP (0: the target's). A narrower MLP keeps a large target's "
                   "drafter small and its forward cheap.")
@click.option("--steps", type=click.IntRange(1), default=260, show_default=True, help="Optimizer steps.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop training after this many minutes even if steps remain.")
@click.option("--batch-tokens", type=click.IntRange(64), default=4096, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--unroll", type=click.IntRange(1, 3), default=2, show_default=True,
              help="Passes per batch: 2 and 3 also train on the drafter's own predicted features, as deeper "
                   "tree levels read them.")
@click.option("--ce-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the cross-entropy against the target's next-token distribution.")
@click.option("--regression-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the smooth-L1 regression onto the target's next feature.")
@click.option("--init", "init_from", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Start from this drafter folder's weights (e.g. the shipped one) instead of random ones.")
@click.option("--teacher", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Take answers and features from this artifact's target graph (exported from TARGET, e.g. with "
                   "--precision int4) instead of the PyTorch model: a quantized target's drafter learns what that "
                   "target says. Its data is cached apart.")
@click.option("--distill-prompts", type=click.IntRange(0), default=1000, show_default=True,
              help="User prompts the target answers greedily (self-distillation).")
@click.option("--distill-skip", type=click.IntRange(0), default=0, show_default=True,
              help="Leave out the stream's first prompts (rounded down to whole chunks of 256): an --init drafter "
                   "that saw them trains on fresh answers, and their data need not be made again.")
@click.option("--mix", "mixes", type=click.Choice(["general", "code"]), multiple=True, default=["general"],
              show_default=True,
              help="The prompt stream: general requests, or mostly code to write, explain and test (a code "
                   "model's drafter). Each mix is its own stream and cache; repeat it to train on several "
                   "(the same prompt range of each).")
@click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True,
              help="Answer length cap for self-distillation.")
@click.option("--text-tokens", type=click.IntRange(0), default=40_000, show_default=True,
              help="Teacher-forced text tokens.")
@click.option("--seq-len", type=click.IntRange(64), default=384, show_default=True,
              help="Longest sequence (prompt + answer); longer prompts are skipped.")
@click.option("--weights", type=click.Choice(["fp16", "int8", "int4"]), default="fp16", show_default=True,
              help="How the drafter's weights are stored: int8 (per-row scales) halves a drafter whose MLP is large, "
                   "int4 (a scale per 32 weights) quarters it.")
@click.option("--draft-vocab", type=click.IntRange(0), default=16384, show_default=True,
              help="Tokens the exported draft head scores by default, most frequent in the data first (0 = all).")
@click.option("--cache", type=click.Path(path_type=Path), default=DEFAULT_CACHE, show_default=True,
              help="Where generated data and checkpoints are kept.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of this output.")
@click.option("--cached-answers", is_flag=True,
              help="Make no new self-distilled answers: train on the range's cached chunks (teacher-forced text is "
                   "still made), e.g. while other processes make the rest.")
@click.option("--data-only", is_flag=True, help="Make (or extend) the cached data, then stop before training.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Torch threads, and the --teacher graph's [default: each library's choice].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the drafter trains: auto takes a CUDA GPU where PyTorch sees one, else the CPU.")
def train(target, output, fusion, layers, intermediate_size, steps, minutes, batch_tokens, lr, unroll, ce_weight,
          regression_weight, init_from, teacher, distill_prompts, distill_skip, mixes, max_new_tokens,
          text_tokens, seq_len, weights, draft_vocab, cache, resume, cached_answers, data_only, threads, seed, device):
    """Train a drafter for TARGET (a Hugging Face folder or a .gguf file) on the target's own outputs."""
    # Every batch has a new shape, and oneDNN caches compiled kernels per shape (1,024 by default): on
    # SmolLM2 the process grew past 13 GB in 200 steps at 795 tokens/s; with 64 it stayed under 8.2 GB at 1,320.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    import torch  # the build side only

    from dovetail_onnx.export.data import DataSettings, describe, make_data
    from dovetail_onnx.export.drafter import load_drafter, save_drafter
    from dovetail_onnx.export.load import load_target
    from dovetail_onnx.export.teacher import ArtifactTeacher
    from dovetail_onnx.export.train import TrainSettings, metrics_json, train_device, train_drafter

    device = train_device(device)  # refused before the data step, not after it
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, tokenizer = load_target(target)
    artifact = ArtifactTeacher(teacher, model, tokenizer, threads) if teacher else None
    sequences = []
    for n, mix in enumerate(dict.fromkeys(mixes)):
        data = DataSettings(distill_prompts=distill_prompts, distill_skip=distill_skip, mix=mix,
                            max_new_tokens=max_new_tokens, text_tokens=text_tokens, seq_len=seq_len, seed=seed)
        sequences += make_data(model, tokenizer, cache, data, answer=not cached_answers, teacher=artifact,
                               text=n == 0)
    data_s = time.perf_counter() - started
    click.echo(f"data: {describe(sequences)} ({data_s:.0f} s)", err=True)
    if data_only:
        return

    settings = TrainSettings(fusion=fusion, layers=layers, intermediate_size=intermediate_size, steps=steps,
                             minutes=minutes, batch_tokens=batch_tokens,
                             lr=lr, unroll=unroll, ce_weight=ce_weight, regression_weight=regression_weight, seed=seed,
                             device=device)
    init = load_drafter(init_from, model, tokenizer) if init_from else None
    checkpoint = Path(cache) / "checkpoints" / f"{Path(output).resolve().name}-{fusion}-{layers}.pt"
    drafter, metrics = train_drafter(model, tokenizer, sequences, settings, checkpoint, resume, init=init)
    drafter.config.draft_vocab_size = draft_vocab
    drafter.config.teacher_precision = artifact.precision if artifact else "fp32"
    save_drafter(drafter, Path(output), weights)
    metrics.extra |= {"data_seconds": round(data_s, 1), "total_seconds": round(time.perf_counter() - started, 1)}
    click.echo(metrics_json(metrics))
