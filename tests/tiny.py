"""Tiny random models with a real byte-level tokenizer and chat template, built in the test session."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                        additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2, bos_token_id=0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **common))
    elif kind == "qwen3":  # per-head q/k norms: attention takes Q, K and V apart
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, tie_word_embeddings=True, **common))
    elif kind == "mistral":  # a window on every layer, short enough to matter in a test
        model = MistralForCausalLM(MistralConfig(head_dim=16, sliding_window=8, **common))
    elif kind == "phi3":  # fused qkv and gate/up projections
        model = Phi3ForCausalLM(Phi3Config(original_max_position_embeddings=512, pad_token_id=0, **common))
    elif kind == "gemma2":  # local and global layers alternating, attention and final logit soft-capping
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, **common))
    elif kind == "granite":  # embedding, residual, attention and logit multipliers
        model = GraniteForCausalLM(GraniteConfig(tie_word_embeddings=True, **common))
    else:
        raise ValueError(kind)
    # Random init gives near-uniform logits; a larger scale makes greedy decoding non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    return model.eval()


def save_model(kind: str, folder: Path, seed: int = 0) -> Path:
    model = make_model(kind, seed)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
