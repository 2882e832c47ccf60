"""`dovetail.json`: what an artifact folder holds, validated as a schema before any graph is loaded.

pydantic checks every field's type and range, so a hand-edited or damaged manifest is refused with
one line naming the field, never half-used (a string EOS id, an empty checksum list).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, \
    model_validator

from dovetail_onnx.runtime.errors import DovetailError

FORMAT_VERSION = 2
MANIFEST = "dovetail.json"
TOKENIZER = "tokenizer.json"
Precision = Literal["fp32", "int8", "int4", "gguf"]  # of the target's weights (export/target.py, export/gguf.py)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# Weights per scale of a quantized target (onnxruntime-genai's builder's choices; 32 is its default). int4 takes
# 128: on the AVX-512 EPYC its speculative decoding ran 1.29x genai's int4 against 1.06x at 32, for 2.0 against
# 2.4 greedy tokens matching fp32 (docs/benchmarks.md, "Block size"); int8, the precision kept for quality, stays at 32.
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZES = {"int8": 32, "int4": 128, "gguf": 32}  # gguf: most GGUF types' block (Q6_K's nodes: 16)
# One verify forward's rows: the target's output buffers hold this many (see buffers.PREFILL_CHUNK).
MAX_TREE_TOKENS = 128
MAX_TOP_K = 16  # candidates per node an exported drafter returns (its in-graph top-k)
SIZINGS = ("cost", "fixed")  # how a step's tree size is chosen (TreeSettings.step_ms)
# Why a quantized target verifies chains: on ORT's attention, and on a kernel graph exported before its trees were
# checked (no `kernel_verify`).
CHAINS_ON_ORT = ("on ONNX Runtime's attention its quantized rows round a tree row that skips other branches' keys "
                 "differently from sequential decoding, so it verifies chains (on dovetail's kernels, where they "
                 "build, it verifies trees)")
CHAINS_UNCHECKED = ("its kernel graph was exported before trees were checked on it, so it verifies chains; re-export "
                    "the artifact to verify trees")


@dataclass(frozen=True)
class TreeSettings:
    top_k: int = 10
    depth: int = 7
    total_tokens: int = 16
    # A node is expanded only if the drafter gives its whole path at least this probability: a drafter forward
    # that can add fewer expected tokens than its share of the step costs more than it earns. 0 expands every
    # node that can enter the tree (EAGLE-2's rule, for a drafter that is cheap next to the target).
    min_prob: float = 0.0
    # Measured ms of one whole step (draft, verify, host) by tree size, 1 token upwards (`bench --tune`). When set,
    # each step's tree takes the size, up to `total_tokens`, with the most expected tokens per ms: a CPU's verify
    # cost climbs in stairs (its GEMM kernels run a few rows a pass), so a step's best size depends on how sure the
    # drafter is this time. Empty: every tree is `total_tokens` big.
    step_ms: tuple[float, ...] = ()

    def problem(self, max_top_k: int) -> str | None:
        """What is out of range, phrased with the CLI's option names; None when the tree is valid."""
        for name, value, low, high in (("--top-k", self.top_k, 1, max_top_k),
                                       ("--depth", self.depth, 1, MAX_TREE_TOKENS - 1),
                                       ("--tree-tokens", self.total_tokens, 2, MAX_TREE_TOKENS)):
            if type(value) is not int or not low <= value <= high:
                return f"{name} must be an integer from {low} to {high}, got {value!r}"
        if type(self.min_prob) not in (int, float) or not 0 <= self.min_prob < 1:
            return f"--min-prob must be a number from 0 to below 1, got {self.min_prob!r}"
        if self.step_ms and not all(type(ms) in (int, float) and 0 < ms < float("inf") for ms in self.step_ms):
            return f"step_ms must be positive milliseconds, got {list(self.step_ms)!r}"
        if self.step_ms and len(self.step_ms) < self.total_tokens:
            return (f"--tree-tokens {self.total_tokens} is beyond the {len(self.step_ms)} tree sizes whose step cost "
                    "was measured (step_ms); use fewer, or --sizing fixed")
        return None

    def sized(self, scores: np.ndarray) -> int:
        """The tree size for candidates whose log-probs (best first) are `scores`: the size with the most expected
        tokens per measured ms, taking a node's drafter path probability as its odds of acceptance (EAGLE-2's
        premise); `total_tokens` when no cost was measured."""
        sizes = min(self.total_tokens, len(scores) + 1)
        if not self.step_ms:
            return sizes
        expected = 1.0 + np.concatenate(([0.0], np.cumsum(np.exp(scores[: sizes - 1]))))
        return int(np.argmax(expected / np.asarray(self.step_ms[:sizes]))) + 1

    def on(self, verify: str) -> TreeSettings:
        """This default as a target graph that verifies `verify` shapes runs it: a chain of the same depth where
        trees are not verified (a quantized target on ONNX Runtime's kernels), else unchanged."""
        if verify == "tree":
            return self
        return replace(self, top_k=1, total_tokens=min(self.total_tokens, self.depth + 1))

    def chain_problem(self, verify: str, why: str = CHAINS_ON_ORT) -> str | None:
        """A target that verifies chains only (quantized activations on ONNX Runtime's attention, see
        export/target.py) needs top_k 1; `why` it does, for the message."""
        if verify == "chain" and self.top_k != 1:
            return f"--top-k must be 1 for this target here, got {self.top_k}: {why}"
        return None


# What `export` stores unless told otherwise: Dovetail's tree, and the least path probability that paid
# on a 2-core CPU drafting with the int8 drafter (docs/benchmarks.md, "min_prob": 0.3-0.5 were best).
EXPORT_TREE = TreeSettings(min_prob=0.4)
# A quantized target's default: the 4 rows of a chain of 3 (there a verify row costs about a target-only token), its
# first level three candidates wide where dovetail's kernels verify trees: a drafter unsure of the next token gets
# it right more often at no extra row. On ONNX Runtime's graph, which verifies chains only, it runs as the chain of
# 3 (`TreeSettings.on`). Measured in docs/benchmarks.md, "A wider first level" and "int4: trees and chains".
EXPORT_QUANTIZED_TREE = TreeSettings(top_k=3, depth=3, total_tokens=4, min_prob=0.4)


def export_tree(verify: str, top_k: int | None = None, depth: int | None = None, total_tokens: int | None = None,
                min_prob: float | None = None) -> TreeSettings:
    """The tree `export` stores for a target whose ONNX Runtime graph verifies `verify` shapes, the values given
    kept: EXPORT_TREE's, or for a quantized target ("chain") EXPORT_QUANTIZED_TREE's with a chain of its depth's
    rows."""
    base = EXPORT_QUANTIZED_TREE if verify == "chain" else EXPORT_TREE
    depth = depth or base.depth
    rows = depth + 1 if verify == "chain" else base.total_tokens
    return TreeSettings(top_k or base.top_k, depth, total_tokens or rows,
                        base.min_prob if min_prob is None else min_prob)


def _file_name(name: str) -> str:
    """Files live in the artifact folder itself: a path would let a manifest point anywhere."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain file name")
    return name


FileName = Annotated[StrictStr, AfterValidator(_file_name)]
Positive = Annotated[StrictInt, Field(ge=1)]


class GraphSpec(BaseModel):
    """Dimensions the runtime needs to allocate KV buffers and bind outputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    file: FileName
    num_layers: Positive
    kv_heads: Positive
    kv_width: Positive  # kv_heads × head_dim
    hidden_size: Positive
    vocab_size: Positive
    precision: Precision = "fp32"
    min_rows: Literal[1, 2] = 1  # rows every forward runs (older quantized exports: 2, see export/target.py)
    attention_rows: Literal[1, 2] = 1  # query rows the attention runs at least (quantized: 2, see export/target.py)
    verify: Literal["tree", "chain"] = "tree"  # draft shapes whose rows equal sequential decoding (on `file`)
    kernel_verify: Literal["tree", "chain"] | None = None  # target only: the same on `kernel_file` (None: `verify`)
    block_size: Positive | None = None  # quantized weights per scale (export --block-size); for the record only
    row_step: Literal[1, 2, 4] = 1  # the exact row multiple the exporting CPU needed (each CPU checks its own)
    cpu_file: FileName | None = None  # drafter only: the quantized graph to use when it runs on a CPU
    # The same graph on dovetail's kernels (runtime/kernels.py): of `file` for a target or draft model, of `cpu_file`
    # for a drafter.
    kernel_file: FileName | None = None
    sliding_window: Positive | None = None  # keys a windowed attention node sees: `attention_bias_local` masks them

    @model_validator(mode="after")
    def _heads(self) -> GraphSpec:
        if self.kv_width % self.kv_heads:
            raise ValueError(f"kv_width {self.kv_width} is not a multiple of kv_heads {self.kv_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.kv_width // self.kv_heads


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)
    folder: Path = Path()  # not in the file: set to where it was read from
    format_version: Literal[2]
    target: GraphSpec
    drafter: GraphSpec | None  # null: no trained drafter for this target
    draft_model: GraphSpec | None = None  # a standalone small LM of the target's tokenizer drafts instead
    max_top_k: Annotated[StrictInt, Field(ge=1, le=1024)]
    fusion: Literal["dgf", "eagle"] | None
    eos_token_ids: Annotated[tuple[Annotated[StrictInt, Field(ge=0)], ...], Field(min_length=1)]
    special_tokens: dict[StrictStr, StrictStr] = {}
    chat_template: StrictStr | None = None
    context_length: Annotated[StrictInt, Field(ge=2)]
    tree: TreeSettings
    checksums: Annotated[dict[FileName, Annotated[StrictStr, Field(pattern="^[0-9a-f]{64}$")]],
                         Field(alias="sha256", min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        # The stored tree is the default on the best graph the artifact has; the other runs it as a chain.
        verify = self.target.kernel_verify or self.target.verify
        if problem := self.tree.problem(self.max_top_k) or self.tree.chain_problem(verify):
            raise ValueError(f"field 'tree': {problem.replace('--', '').replace('-', '_')}")
        if self.drafter and self.draft_model:
            raise ValueError("fields 'drafter' and 'draft_model' are both set; an artifact drafts with one of them")
        if self.draft_model and self.draft_model.vocab_size != self.target.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.draft_model.vocab_size}) is not the target's "
                             f"({self.target.vocab_size}); export with a draft model of the target's tokenizer")
        if self.drafter and (self.drafter.hidden_size != self.target.hidden_size
                             or self.drafter.vocab_size != self.target.vocab_size):
            raise ValueError(
                f"the drafter (hidden {self.drafter.hidden_size}, vocabulary {self.drafter.vocab_size}) was not made "
                f"for this target (hidden {self.target.hidden_size}, vocabulary {self.target.vocab_size}); export "
                "with a drafter trained for this target"
            )
        if bad := [i for i in self.eos_token_ids if i >= self.target.vocab_size]:
            raise ValueError(f"field 'eos_token_ids': {bad} are outside the vocabulary of {self.target.vocab_size}")
        if missing := sorted(({*self.graph_files, TOKENIZER} - set(self.checksums))):
            raise ValueError(f"field 'sha256' does not cover {', '.join(missing)}")
        return self

    @property
    def graph_files(self) -> list[str]:
        drafter = (self.drafter.file, self.drafter.cpu_file, self.drafter.kernel_file) if self.drafter else ()
        draft_model = (self.draft_model.file, self.draft_model.kernel_file) if self.draft_model else ()
        return [f for f in (self.target.file, self.target.kernel_file, *drafter, *draft_model) if f]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _field_error(path: Path, exc: ValidationError) -> DovetailError:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "json_invalid":
        return DovetailError(f"{path} is not valid JSON ({message}); re-export the artifact")
    field = f"field '{where}': " if where else ""
    return DovetailError(f"{path}: {field}{message}; re-export the artifact or correct that field")


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Parse and check an artifact folder; every problem is one DovetailError line."""
    folder = Path(folder)
    fix = "run `dovetail-onnx export` to create it"
    if folder.is_file():
        raise DovetailError(f"{folder} is a file; pass the artifact folder that holds {MANIFEST}")
    if not folder.is_dir():
        raise DovetailError(f"artifact folder {folder} does not exist; {fix}")
    path = folder / MANIFEST
    if not path.is_file():
        raise DovetailError(f"{folder} has no {MANIFEST}; it is not a dovetail-onnx artifact ({fix})")
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json.loads(text)
    except OSError as exc:
        raise DovetailError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from exc
    except UnicodeDecodeError as exc:
        raise DovetailError(f"{path} is corrupt: not UTF-8 text ({exc.reason} at byte {exc.start}); re-export it") from exc
    except json.JSONDecodeError as exc:
        raise DovetailError(f"{path} is corrupt: not JSON ({exc.msg}, line {exc.lineno}); re-export it") from exc
    if not isinstance(raw, dict):
        raise DovetailError(f"{path} is corrupt: a {type(raw).__name__}, not a JSON object; re-export it")
    if type(raw.get("format_version")) is not int or raw["format_version"] != FORMAT_VERSION:
        raise DovetailError(
            f"{path} is format {raw.get('format_version')!r}, this runtime reads {FORMAT_VERSION}; re-export it"
        )
    try:
        manifest = Manifest.model_validate_json(text).model_copy(update={"folder": folder})
    except ValidationError as exc:
        raise _field_error(path, exc) from exc
    undeclared = [f"{g}.data" for g in manifest.graph_files
                  if (folder / f"{g}.data").exists() and f"{g}.data" not in manifest.checksums]
    if undeclared:
        raise DovetailError(f"{path}: field 'sha256' does not cover {', '.join(undeclared)}; re-export the artifact")
    for name, expected in manifest.checksums.items():
        file = folder / name
        if not file.is_file():
            raise DovetailError(f"{file} is missing; re-export the artifact")
        if not verify:
            continue
        try:
            actual = sha256_of(file)
        except OSError as exc:
            raise DovetailError(f"cannot read {file} ({exc.strerror or exc}); check its permissions") from exc
        if actual != expected:
            raise DovetailError(f"{file} is corrupt or truncated (SHA-256 mismatch); re-export the artifact")
    return manifest
