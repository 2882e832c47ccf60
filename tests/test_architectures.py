"""Each architecture export takes, on a tiny random config: the user's own model with no drafter option drafts by
prompt lookup, and `generate --raw --json` gives transformers' greedy tokens, speculative and target-only."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from dovetail_onnx.cli.main import main
from dovetail_onnx.runtime import Model
from tiny import save_model

ARCHITECTURES = ["qwen3", "mistral", "phi3", "gemma2", "granite"]
PROMPT = "1, 2, 3, 4, 1, 2, 3, 4, hello"  # repeats itself, so lookup has something to copy
TOKENS = 40  # past the tiny windows of 8: Mistral's and Gemma-2's local layers see only the last keys


def greedy(folder, prompt: list[int]) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def generated(folder, mode: str) -> dict:
    result = CliRunner().invoke(main, ["generate", str(folder), "--prompt", PROMPT, "--raw", "--json", "--ignore-eos",
                                       "--max-new-tokens", str(TOKENS), "--mode", mode, "--draft-device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_a_users_model_exports_with_no_drafter_and_equals_transformers(kind, tmp_path):
    source = save_model(kind, tmp_path / "hf")
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    assert "drafts by prompt lookup" in result.stderr
    expected = greedy(source, Model(tmp_path / "art").encode_prompt(PROMPT, raw=True))
    speculative = generated(tmp_path / "art", "speculative")
    assert speculative["token_ids"] == expected and speculative["stats"]["accepted_copied"] > 0
    assert generated(tmp_path / "art", "target-only")["token_ids"] == expected


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_windowed_attention_verifies_trees_exactly(kind, tmp_path):
    """Drafted trees (a random drafter) over windowed layers: each tree row's window is its own position's."""
    source = save_model(kind, tmp_path / "hf")
    result = CliRunner().invoke(main, ["export", str(source), "-o", str(tmp_path / "art"), "--drafter", "random",
                                       "--top-k", "4", "--depth", "3", "--tree-tokens", "8", "--min-prob", "0"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "art" / "dovetail.json").read_text())
    assert manifest["target"]["sliding_window"] == 8 and manifest["target"]["verify"] == "tree"
    expected = greedy(source, Model(tmp_path / "art").encode_prompt(PROMPT, raw=True))
    assert generated(tmp_path / "art", "speculative")["token_ids"] == expected
