"""`dovetail.json`: what an artifact folder holds, checked before any graph is loaded."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dovetail_onnx.runtime.errors import DovetailError

FORMAT_VERSION = 1
MANIFEST = "dovetail.json"


@dataclass(frozen=True)
class GraphSpec:
    """Dimensions the runtime needs to allocate KV buffers and bind outputs."""

    file: str
    num_layers: int
    kv_width: int
    hidden_size: int
    vocab_size: int
    cpu_file: str | None = None  # drafter only: the int8 graph to use when it runs on a CPU


@dataclass(frozen=True)
class TreeSettings:
    top_k: int = 10
    depth: int = 7
    total_tokens: int = 16


@dataclass(frozen=True)
class Manifest:
    folder: Path
    target: GraphSpec
    drafter: GraphSpec
    max_top_k: int
    fusion: str
    eos_token_ids: tuple[int, ...]
    special_tokens: dict
    chat_template: str | None
    context_length: int
    tree: TreeSettings
    checksums: dict


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Parse and check an artifact folder; every problem is one DovetailError line."""
    folder = Path(folder)
    fix = "run `dovetail-onnx export` to create it"
    if not folder.is_dir():
        raise DovetailError(f"artifact folder {folder} does not exist; {fix}")
    path = folder / MANIFEST
    if not path.is_file():
        raise DovetailError(f"{folder} has no {MANIFEST}; it is not a dovetail-onnx artifact ({fix})")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format_version") != FORMAT_VERSION:
            raise DovetailError(
                f"{path} is format {raw.get('format_version')}, this runtime reads {FORMAT_VERSION}; re-export it"
            )
        manifest = Manifest(
            folder=folder,
            target=GraphSpec(**raw["target"]),
            drafter=GraphSpec(**raw["drafter"]),
            max_top_k=raw["max_top_k"],
            fusion=raw["fusion"],
            eos_token_ids=tuple(raw["eos_token_ids"]),
            special_tokens=raw.get("special_tokens", {}),
            chat_template=raw.get("chat_template"),
            context_length=raw["context_length"],
            tree=TreeSettings(**raw["tree"]),
            checksums=raw["sha256"],
        )
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DovetailError(f"{path} is corrupt ({type(exc).__name__}: {exc}); {fix} again") from exc
    if manifest.drafter.hidden_size != manifest.target.hidden_size:
        raise DovetailError(
            f"drafter hidden size {manifest.drafter.hidden_size} does not match the target's "
            f"{manifest.target.hidden_size}; export with a drafter trained for this target"
        )
    if manifest.drafter.vocab_size != manifest.target.vocab_size:
        raise DovetailError(
            f"drafter vocabulary {manifest.drafter.vocab_size} does not match the target's "
            f"{manifest.target.vocab_size}; export with a drafter trained for this target"
        )
    for name, expected in manifest.checksums.items():
        file = folder / name
        if not file.is_file():
            raise DovetailError(f"{file} is missing; re-export the artifact")
        if verify and sha256_of(file) != expected:
            raise DovetailError(f"{file} is corrupt or truncated (SHA-256 mismatch); re-export the artifact")
    return manifest
