"""Tiny Llama (GQA, tied) and Qwen2 (qkv bias, untied) targets, exported once per test session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM

from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.runtime import Model, TreeSettings
from tiny import make_tokenizer, save_model

KINDS = ("llama", "qwen2")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_model(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="session")
def artifacts(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """Trees expand every node that can enter them (min_prob 0): a random drafter's paths are all unlikely, and
    the tests are after deep trees."""
    root = tmp_path_factory.mktemp("artifacts")
    quiet = Console(stderr=True, quiet=True)
    return {kind: export_artifact(folder, root / kind, "random", 2, TreeSettings(), console=quiet) and root / kind
            for kind, folder in hf_dirs.items()}


@pytest.fixture(scope="session")
def quantized(hf_dirs, tmp_path_factory) -> dict[str, Model]:
    """The tiny Llama with int8 and int4 (MatMulNBits) target weights."""
    root = tmp_path_factory.mktemp("quantized")
    quiet = Console(stderr=True, quiet=True)
    for precision in ("int8", "int4"):
        export_artifact(hf_dirs["llama"], root / precision, "random", 1, precision=precision, console=quiet)
    return {precision: Model(root / precision, draft_device="cpu", threads=1) for precision in ("int8", "int4")}


@pytest.fixture(scope="session")
def genai_dir(hf_dirs, tmp_path_factory) -> Path:
    """onnxruntime-genai's own fp32 build of the tiny Llama: the baseline `bench --baseline-genai` runs."""
    out = tmp_path_factory.mktemp("genai")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dirs["llama"]), "-o", str(out),
                    "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def models(artifacts) -> dict[str, Model]:
    return {kind: Model(folder, draft_device="cpu", threads=1) for kind, folder in artifacts.items()}


@pytest.fixture(scope="session")
def references(hf_dirs):
    """transformers' own greedy decoding, the ground truth for every equality test."""
    loaded = {kind: AutoModelForCausalLM.from_pretrained(folder).eval() for kind, folder in hf_dirs.items()}

    def greedy(kind: str, prompt: list[int], max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = loaded[kind].generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return greedy


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()
