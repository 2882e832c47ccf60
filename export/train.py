"""Train a drafter on features the target produced (export/data.py), EAGLE-style.

At drafter position i the input is (target feature of token i, token i+1) and the output should be
the target's feature of token i+1; the frozen LM head turns it into a guess for token i+2.

Objective (EAGLE's terms): smooth-L1 between predicted and true features + cross-entropy between the
head's distribution on the true feature and on the predicted one. EAGLE weighs the cross-entropy
0.1; here 1.0, which gave the better held-out top-1 on SmolLM2 (0.416 against 0.409 after 50 steps
from the same weights; regression off: 0.412). The cross-entropy is taken over
the draft vocabulary (the most frequent tokens of the training data, what the exported head scores),
which also keeps the head's cost below the drafter's.

Input noise: each input feature gets uniform noise U(-a, a)·rms(feature), a = 0.1 by default.
EAGLE adds U(-0.1, 0.1) to features of order one; scaling by the feature's RMS keeps the same
relative size whatever the target's feature scale.

Deeper tree levels feed the drafter its own predictions. With `unroll=n` every batch gets n − 1 more
passes; pass d reads pass d − 1's predictions (shifted by one position, detached) and attends to what a
depth-(d + 1) tree node sees at run time: first-pass keys up to d positions back, then one key of each
later pass along its own path (unrolled_mask). Pass d's loss is weighted by `unroll_weight ** d`.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.export.data import Sequence
from dovetail_onnx.export.drafter import Drafter, DrafterConfig, deepen, rank_tokens
from dovetail_onnx.export.modules import causal_mask
from dovetail_onnx.runtime.errors import DovetailError


def native_bf16() -> bool:
    """Whether this CPU computes bf16 products in hardware (AVX512-BF16, AMX). oneDNN's own check
    (`_is_mkldnn_bf16_supported`) also says yes for AVX-512 without BF16, where it emulates them several times
    slower than fp32 (docs/training.md)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


@dataclass
class TrainSettings:
    fusion: str = "dgf"
    layers: int = 1
    intermediate_size: int = 0  # the drafter MLP's width (0: the target's)
    steps: int = 260
    minutes: float | None = None  # wall-clock cap; stops early (schedule still planned for `steps`)
    batch_tokens: int = 4096
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    clip: float = 0.5
    noise: float = 0.1
    ce_weight: float = 1.0
    regression_weight: float = 1.0
    loss_vocab: int = 16384  # tokens the cross-entropy is taken over, most frequent first (0 = all seen)
    unroll: int = 2
    unroll_weight: float = 0.8
    # Autocast matmuls to bf16 where the CPU has bf16 units: the LM head dominates the cost.
    bf16: bool = field(default_factory=native_bf16)
    checkpoint_every: int = 50
    eval_tokens: int = 4096  # held-out tokens used by the periodic evaluation (the final one uses all)
    seed: int = 0
    device: str = "cpu"  # where the drafter trains: "cpu" or "cuda" (train_device resolves the CLI's choice)

    @property
    def autocast(self) -> torch.autocast:
        """bf16 matmuls where the device computes them natively (see `bf16`; on CUDA, Ampere and newer)."""
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)


DEVICES = ("auto", "cpu", "cuda")


def train_device(choice: str) -> str:
    """`auto`: CUDA where PyTorch sees a GPU (Dovetail trains its drafters on one), else the CPU; `cuda` without
    one is refused in one line."""
    if choice not in DEVICES:
        raise DovetailError(f"unknown training device {choice!r}; use one of {', '.join(DEVICES)}")
    usable = torch.cuda.is_available()
    if choice == "cuda" and not usable:
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise DovetailError(f"--device cuda, but PyTorch ({torch.__version__}, {build}) sees no CUDA GPU; install a "
                            "CUDA build of torch on a machine with an NVIDIA GPU, or train with --device cpu")
    return "cuda" if choice == "cuda" or choice == "auto" and usable else "cpu"


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T+1]
    features: torch.Tensor  # [B, T+1, H] float32
    valid: torch.Tensor  # [B, T] bool: position i predicts the feature of ids[i+1]
    answer: torch.Tensor  # [B, T] bool: positions whose target token is a self-distilled answer token

    def to(self, device: str) -> Batch:
        return Batch(self.ids.to(device), self.features.to(device), self.valid.to(device), self.answer.to(device))


@dataclass
class Metrics:
    loss: float = 0.0
    acc1: float = 0.0  # top-1 through the head vs the target's greedy next token
    acc2: float = 0.0  # second unrolled step, given the first step's token was right
    tokens: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- batches


def collate(sequences: list[Sequence]) -> Batch:
    """Right-pad to the longest; the causal mask alone keeps valid queries off padded keys."""
    width = max(len(s.ids) for s in sequences)
    hidden = sequences[0].features.shape[1]
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    features = torch.zeros(len(sequences), width, hidden)
    valid = torch.zeros(len(sequences), width - 1, dtype=torch.bool)
    answer = torch.zeros_like(valid)
    for b, s in enumerate(sequences):
        n = len(s.ids)
        ids[b, :n], features[b, :n] = s.ids, s.features.float()
        valid[b, : n - 1] = True
        if s.kind == "distill":
            answer[b, max(s.start - 2, 0): n - 1] = True
    return Batch(ids, features, valid, answer)


def sample_batch(sequences: list[Sequence], batch_tokens: int, rng: random.Random) -> Batch:
    """Random sequences until the token budget is reached (at least one)."""
    picked, total = [], 0
    while total < batch_tokens:
        s = sequences[rng.randrange(len(sequences))]
        picked.append(s)
        total += len(s.ids)
    return collate(picked)


def eval_batches(sequences: list[Sequence], batch_tokens: int, limit: int | None = None) -> list[Batch]:
    """The held-out sequences in a fixed order, packed by length."""
    out, group, total, seen = [], [], 0, 0
    for s in sorted(sequences, key=lambda s: len(s.ids)):
        if limit is not None and seen >= limit:
            break
        group.append(s)
        total += len(s.ids)
        seen += len(s.ids)
        if total >= batch_tokens:
            out.append(collate(group))
            group, total = [], 0
    return out + ([collate(group)] if group else [])


# ---------------------------------------------------------------- model passes


def empty_past(drafter: Drafter, batch: int, device: torch.device) -> list[torch.Tensor]:
    c = drafter.config
    width = c.num_key_value_heads * c.head_dim
    return [torch.zeros(batch, 0, width, device=device) for _ in range(2 * c.num_layers)]


def unrolled_mask(seq: int, depth: int = 1) -> torch.Tensor:
    """Pass `depth` over the keys of passes 0..depth: at position j, first-pass keys at positions
    ≤ j − depth, then pass i's key at j − depth + i — the path of a depth-(depth + 1) tree node."""
    low = torch.finfo(torch.float32).min
    query, key = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    blocks = [torch.where(key <= query - depth, 0.0, low)]
    blocks += [torch.where(key == query - depth + i, 0.0, low) for i in range(1, depth + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def add_noise(features: torch.Tensor, scale: float) -> torch.Tensor:
    if scale <= 0:
        return features
    rms = features.pow(2).mean(-1, keepdim=True).sqrt()
    return features + (torch.rand_like(features) * 2 - 1) * scale * rms


def predict(drafter: Drafter, batch: Batch, unroll: int, noise: float) -> list[torch.Tensor]:
    """Predicted next features for each unrolled pass, each [B, T, H]."""
    inputs, ids = add_noise(batch.features[:, :-1], noise), batch.ids[:, 1:]
    size, seq = ids.shape
    device = ids.device
    positions = torch.arange(seq, device=device).expand(size, seq)
    first, *past = drafter(inputs, ids, positions, causal_mask(seq).to(device), *empty_past(drafter, size, device))
    preds = [first]
    for depth in range(1, unroll):
        fed = torch.cat((inputs[:, :1], preds[-1][:, :-1].detach()), dim=1)
        pred, *new = drafter(fed, ids, positions, unrolled_mask(seq, depth).to(device), *past)
        preds.append(pred)
        past = [torch.cat((old, added), dim=1) for old, added in zip(past, new)]
    return preds


def losses(drafter: Drafter, preds: list[torch.Tensor], batch: Batch, settings: TrainSettings,
           head: torch.Tensor | None = None, chunk_rows: int | None = None):
    """Weighted EAGLE loss over the passes, plus per-pass argmax hits for accuracy.

    `head`: LM-head rows to score against (default: all). Training passes only the tokens that occur
    in its data: softmaxes over the full 49k-token vocabulary would cost more than the drafter.
    `chunk_rows`: score this many positions at a time (evaluation without gradients): a 4,096-token
    batch against a 152k-token head would otherwise hold several [4096, 152k] float tensors at once.
    """
    head = drafter.lm_head.weight if head is None else head
    target = batch.features[:, 1:][batch.valid]
    flat = [pred[batch.valid] for pred in preds]
    chosen = []
    for depth in range(len(preds)):
        keep = batch.valid.clone()
        keep[:, :depth] = False  # too close to the start for a prediction to feed it
        chosen.append(keep[batch.valid])
    step = chunk_rows or max(len(target), 1)
    terms: list[list[torch.Tensor]] = [[] for _ in preds]
    hits: list[list[torch.Tensor]] = [[] for _ in preds]
    for start in range(0, len(target), step):
        rows = slice(start, start + step)
        with torch.no_grad():
            target_logits = F.linear(target[rows], head).float()
            target_probs = target_logits.softmax(-1)
            target_tokens = target_logits.argmax(-1)
        for depth, pred in enumerate(flat):
            regression = F.smooth_l1_loss(pred[rows].float(), target[rows], reduction="none").mean(-1)
            logp = F.linear(pred[rows], head).float().log_softmax(-1)
            ce = -(target_probs * logp).sum(-1)
            loss = settings.regression_weight * regression + settings.ce_weight * ce
            terms[depth].append((loss * chosen[depth][rows]).sum())
            hits[depth].append((logp.argmax(-1) == target_tokens) & chosen[depth][rows])
    total = sum(settings.unroll_weight**depth * torch.stack(parts).sum() / chosen[depth].sum().clamp(min=1)
                for depth, parts in enumerate(terms))
    return total, [torch.cat(h) for h in hits]


def hit_counts(hits: list[torch.Tensor], batch: Batch, answers_only: bool) -> tuple[int, int, int, int]:
    """(first-pass hits, positions counted, second-pass hits, positions whose previous first pass hit)."""
    region = batch.answer[batch.valid] if answers_only else torch.ones_like(hits[0])
    first, counted = int((hits[0] & region).sum()), int(region.sum())
    if len(hits) < 2:
        return first, counted, 0, 0
    grid = torch.zeros_like(batch.valid)
    grid[batch.valid] = hits[0]
    prior = torch.zeros_like(batch.valid)
    prior[:, 1:] = grid[:, :-1]
    given = prior[batch.valid] & region
    return first, counted, int((hits[1] & given).sum()), int(given.sum())


EVAL_CHUNK_ROWS = 512


@torch.no_grad()
def evaluate(drafter: Drafter, batches: list[Batch], settings: TrainSettings) -> Metrics:
    """Held-out top-1 on the self-distilled answers (what acceptance at run time depends on) and overall."""
    drafter.eval()
    loss, answer, overall = 0.0, torch.zeros(4), torch.zeros(4)
    for batch in batches:
        batch = batch.to(settings.device)
        with settings.autocast:
            batch_loss, hits = losses(drafter, predict(drafter, batch, max(settings.unroll, 2), 0.0), batch, settings,
                                      chunk_rows=EVAL_CHUNK_ROWS)
        hits = [h.cpu() for h in hits]
        batch = batch.to("cpu")
        answer += torch.tensor(hit_counts(hits, batch, answers_only=True))
        overall += torch.tensor(hit_counts(hits, batch, answers_only=False))
        loss += batch_loss.item() * int(batch.valid.sum())
    drafter.train()
    tokens = int(overall[1])
    return Metrics(loss=loss / max(tokens, 1), acc1=float(answer[0] / answer[1].clamp(min=1)),
                   acc2=float(answer[2] / answer[3].clamp(min=1)), tokens=tokens,
                   extra={"all_top1": round(float(overall[0] / overall[1].clamp(min=1)), 4),
                          "answer_tokens": int(answer[1])})


# ---------------------------------------------------------------- optimisation


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio · lr at `steps`."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = min((step - settings.warmup) / max(settings.steps - settings.warmup, 1), 1.0)
    floor = settings.min_lr_ratio
    return settings.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_tokens(ranking: torch.Tensor, sequences: list[Sequence], size: int) -> torch.Tensor:
    """The ids the cross-entropy is taken over: the `size` most frequent, or every id the data holds."""
    seen = torch.unique(torch.cat([s.ids for s in sequences]))
    return ranking[:size].sort().values if 0 < size < len(seen) else seen


def trainable(drafter: Drafter) -> list[torch.nn.Parameter]:
    return [p for p in drafter.parameters() if p.requires_grad]


def save_checkpoint(path: Path, drafter: Drafter, optimizer: torch.optim.Optimizer, step: int,
                    settings: TrainSettings) -> None:
    """Atomic: an interruption while writing leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "settings": asdict(settings), "drafter": drafter.trained_state_dict(),
                "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, drafter: Drafter, optimizer: torch.optim.Optimizer,
                    settings: TrainSettings) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    keys = ("fusion", "layers", "intermediate_size")
    saved = {k: state["settings"].get(k, 0) for k in keys}
    if saved != {k: getattr(settings, k) for k in keys}:
        raise DovetailError(f"checkpoint {path} is for {saved}, not this drafter; drop --resume to start over")
    drafter.load_state_dict(state["drafter"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def train_drafter(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: list[Sequence],
                  settings: TrainSettings, checkpoint: Path | None = None, resume: bool = False,
                  progress: bool = True, init: Drafter | None = None) -> tuple[Drafter, Metrics]:
    """Train a drafter and return it with held-out metrics: fresh, from `init`'s weights (a shipped
    drafter trained on more data goes on learning), or resumed from `checkpoint`."""
    train = [s for s in sequences if not s.heldout and len(s.ids) > 1]
    heldout = [s for s in sequences if s.heldout and len(s.ids) > 1]
    if not train or not heldout:
        raise DovetailError("not enough training data: make more sequences (more prompts or text tokens)")
    torch.manual_seed(settings.seed)
    drafter = Drafter(DrafterConfig.for_target(target, tokenizer, settings.fusion, settings.layers,
                                                   settings.intermediate_size))
    if init is not None:
        if init.config.intermediate_size != drafter.config.intermediate_size:
            raise DovetailError(f"--init drafter's MLP is {init.config.intermediate_size} wide, not "
                                f"{drafter.config.intermediate_size}; pass --intermediate-size "
                                f"{init.config.intermediate_size}")
        if init.config.fusion != settings.fusion or init.config.num_layers > settings.layers:
            raise DovetailError(f"--init drafter is {init.config.fusion} with {init.config.num_layers} layers, "
                                f"not {settings.fusion} with {settings.layers}; use --fusion {init.config.fusion} "
                                f"and --layers {init.config.num_layers} or more (added layers start as the identity)")
        deepen(drafter, init)
    drafter.attach_target(target).train()
    # The drafter shares the target's embeddings and head, which move with it (and back, below).
    drafter.to(settings.device)
    # Tokens the target emits (answers and text), most frequent first: the draft vocabulary. An --init drafter keeps
    # its own, ranked on all the data it learned from: a fresh slice of the stream is too small to re-rank by.
    drafter.token_ranking = init.token_ranking.clone() if init is not None else rank_tokens(
        [s.ids[s.start:] for s in train], drafter.config.vocab_size)
    optimizer = torch.optim.AdamW(trainable(drafter), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=settings.weight_decay)
    step = 0
    if resume and checkpoint is not None and checkpoint.exists():
        step = load_checkpoint(checkpoint, drafter, optimizer, settings)
    quick_eval = eval_batches(heldout, settings.batch_tokens, settings.eval_tokens)
    head = drafter.lm_head.weight[loss_tokens(drafter.token_ranking, train, settings.loss_vocab)]
    if init is not None and step == 0:  # the starting point of the curve: what the data adds shows against it
        held = evaluate(drafter, quick_eval, settings)
        tqdm.write(f"step 0 (--init): held-out loss {held.loss:.3f}, top-1 {held.acc1:.3f}, 2nd step {held.acc2:.3f}")
    started, seen = time.perf_counter(), 0
    bar = tqdm(total=settings.steps, initial=step, desc="train drafter", unit="step", disable=not progress)
    while step < settings.steps:
        if settings.minutes is not None and time.perf_counter() - started > settings.minutes * 60:
            break
        rng = random.Random(settings.seed * 1_000_003 + step)  # batch depends on the step only: resumable
        torch.manual_seed(settings.seed * 1_000_003 + step)
        batch = sample_batch(train, settings.batch_tokens, rng).to(settings.device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        with settings.autocast:
            preds = predict(drafter, batch, settings.unroll, settings.noise)
            loss, hits = losses(drafter, preds, batch, settings, head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(drafter), settings.clip)
        optimizer.step()
        step += 1
        seen += int(batch.valid.sum())
        first, counted = int(hits[0].sum()), int(batch.valid.sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{first / max(counted, 1):.3f}",
                        tok_s=f"{seen / (time.perf_counter() - started):.0f}")
        if checkpoint is not None and (step % settings.checkpoint_every == 0 or step == settings.steps):
            save_checkpoint(checkpoint, drafter, optimizer, step, settings)
            held = evaluate(drafter, quick_eval, settings)
            bar.write(f"step {step}: held-out loss {held.loss:.3f}, top-1 {held.acc1:.3f}, 2nd step {held.acc2:.3f}")
    bar.close()
    if checkpoint is not None:
        save_checkpoint(checkpoint, drafter, optimizer, step, settings)
    metrics = evaluate(drafter, eval_batches(heldout, settings.batch_tokens), settings)
    metrics.extra |= {"steps": step, "train_seconds": round(time.perf_counter() - started, 1),
                      "device": settings.device}
    drafter.to("cpu")
    return drafter, metrics


def metrics_json(metrics: Metrics) -> str:
    return json.dumps({"heldout_loss": round(metrics.loss, 4), "heldout_top1": round(metrics.acc1, 4),
                       "heldout_top1_step2": round(metrics.acc2, 4), "heldout_tokens": metrics.tokens,
                       **metrics.extra})
