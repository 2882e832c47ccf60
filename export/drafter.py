"""The EAGLE-style drafter: fusion of (target feature, next-token embedding), a few Llama layers.

Fusions:
- `dgf` (Dovetail's Dynamic Gating Fusion): e = RMSNorm(embed(tok)); h1 = f·W1; h2 = SiLU(e·W2);
  z = σ([h1; h2]·Wz); h = z⊙h1 + (1−z)⊙h2.
- `eagle` (EAGLE-1/2): h = fc([embed(tok); f]).
Parameter names follow the reference checkpoints (`W_1, W_2, W_z, input_layernorm.weight` /
`fc.weight, fc.bias`, then `layers.N.*`) so their weights load as they are. The first layer skips
its input norm, as both references do. Embeddings and LM head are the target's, frozen, and are
never saved with the drafter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from dovetail_onnx.export.modules import decoder_layer
from dovetail_onnx.runtime.errors import DovetailError

FUSIONS = ("dgf", "eagle")


@dataclass
class DrafterConfig:
    fusion: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict
    max_position_embeddings: int
    vocab_size: int
    target: dict = field(default_factory=dict)
    # Tokens the exported head scores (0: all). On a CPU the vocabulary-wide head dominates a draft
    # step; the most frequent tokens of the target's own outputs keep almost all of the acceptance.
    draft_vocab_size: int = 0
    # The precision of the target graph whose answers and features it was distilled from (`train --teacher`):
    # an int4 target says other things than fp32, so export prefers a shipped drafter made for its precision.
    teacher_precision: str = "fp32"

    @classmethod
    def for_target(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, fusion: str, num_layers: int,
                   intermediate_size: int = 0):
        """Shaped like one of the target's layers; `intermediate_size` (0: the target's) narrows the MLP, which
        holds most of a layer's weights: a 1.5B target's full layer would not fit the 40 MB a drafter ships in."""
        if fusion not in FUSIONS:
            raise DovetailError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        if not 1 <= num_layers <= 6:
            raise DovetailError(f"drafter layers must be 1..6, got {num_layers}")
        c = model.config
        return cls(
            fusion=fusion,
            num_layers=num_layers,
            hidden_size=c.hidden_size,
            intermediate_size=intermediate_size or c.intermediate_size,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rms_norm_eps=c.rms_norm_eps,
            rope_parameters=dict(c.rope_parameters),
            max_position_embeddings=c.max_position_embeddings,
            vocab_size=c.vocab_size,
            target=target_fingerprint(model, tokenizer),
        )

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope_parameters,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
        )

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.num_attention_heads, self.num_key_value_heads, self.head_dim


def target_fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """What a drafter must match: the feature space (architecture, width) and the vocabulary."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {
        "architecture": type(model).__name__,
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "vocab_size": model.config.vocab_size,
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
    }


def weights_digest(model: PreTrainedModel) -> str:
    """Tell apart fine-tunes that share architecture and vocabulary (a few tensors suffice)."""
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict().items())[:4] + list(model.state_dict().items())[-2:]:
        digest.update(name.encode())
        digest.update(tensor.float().flatten()[:65536].numpy().tobytes())
    return digest.hexdigest()[:16]


def target_source(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Which model an artifact was exported from (its manifest's `source`): a teacher must be that very model."""
    return target_fingerprint(model, tokenizer) | {"weights": weights_digest(model)}


class Drafter(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        if config.fusion == "dgf":
            self.input_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
            self.W_1 = nn.Parameter(torch.empty(hidden, hidden))
            self.W_2 = nn.Parameter(torch.empty(hidden, hidden))
            self.W_z = nn.Parameter(torch.empty(2 * hidden, hidden))
            for w in (self.W_1, self.W_2, self.W_z):
                nn.init.xavier_uniform_(w)
        else:
            self.fc = nn.Linear(2 * hidden, hidden, bias=True)
        llama = config.llama_config()
        self.layers = nn.ModuleList(LlamaDecoderLayer(llama, i) for i in range(config.num_layers))
        self.rotary_emb = LlamaRotaryEmbedding(llama)
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        # Token ids by falling frequency in the training data; without data, id order (BPE merge order).
        self.token_ranking = torch.arange(config.vocab_size)

    def draft_vocab(self, size: int) -> torch.Tensor | None:
        """The ids a `size`-token draft head keeps (None: the whole vocabulary)."""
        if not size or size >= self.config.vocab_size:
            return None
        return self.token_ranking[:size].sort().values

    def attach_target(self, target: PreTrainedModel) -> "Drafter":
        """Share the target's (frozen) embeddings and LM head."""
        self.embed_tokens.weight = target.get_input_embeddings().weight
        self.lm_head.weight = target.get_output_embeddings().weight
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        return self

    def fuse(self, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids).to(features.dtype)
        if self.config.fusion == "eagle":
            return self.fc(torch.cat((embeds, features), dim=-1))
        e = self.input_layernorm(embeds)
        h1 = features @ self.W_1
        h2 = F.silu(e @ self.W_2)
        z = torch.sigmoid(torch.cat((h1, h2), dim=-1) @ self.W_z)
        return z * h1 + (1 - z) * h2

    def forward(self, features, input_ids, position_ids, attention_mask, *past):
        """Predicted next features and the new K/V (runtime contract of modules.py)."""
        x = self.fuse(features, input_ids)
        cos, sin = self.rotary_emb(x, position_ids)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, k, v = decoder_layer(
                layer, x, cos, sin, past[2 * i], past[2 * i + 1], attention_mask, self.config.dims, norm_input=i > 0
            )
            new_kv += [k, v]
        return (x, *new_kv)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("embed_tokens.", "lm_head."))}


def deepen(drafter: Drafter, init: Drafter) -> Drafter:
    """Start `drafter` from `init`'s weights when it has more layers: each added layer is a copy of
    init's last one with its two output projections zeroed, so it adds nothing to the residual and the
    deeper drafter predicts exactly what the shallower one did. Training then only has to improve on a
    drafter that already accepts, instead of starting a deeper one from random weights."""
    state = init.trained_state_dict()
    last = f"layers.{init.config.num_layers - 1}."
    for i in range(init.config.num_layers, drafter.config.num_layers):
        for key, value in init.trained_state_dict().items():
            if key.startswith(last):
                silent = key.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight"))
                state[f"layers.{i}." + key.removeprefix(last)] = torch.zeros_like(value) if silent else value.clone()
    drafter.load_state_dict(state, strict=False)
    return drafter


def rank_tokens(token_ids: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """All token ids, most frequent first (ties by id): the order a truncated draft head keeps them in."""
    counts = torch.bincount(torch.cat(token_ids).long(), minlength=vocab_size)[:vocab_size]
    return torch.argsort(counts, descending=True, stable=True)


WEIGHTS = ("fp32", "fp16", "int8", "int4")
SCALE = ".int8_scale"  # suffix of a matrix's per-row scales when it is stored in int8
SCALE4 = ".int4_scale"  # suffix of a matrix's per-group scales when it is stored in int4
GROUP = 32  # int4 weights per scale


def pack_int8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices as int8 with one fp16 scale per row (symmetric), the rest in fp16.

    A drafter on a large-vocabulary target is mostly its MLP: Qwen2.5-0.5B's one layer is 37 MB in
    fp16 and 20 MB like this. The CPU drafter is quantized per output channel again at export, so
    the stored rounding is of the same size as the one it runs with."""
    packed = {}
    for name, tensor in tensors.items():
        if tensor.dim() != 2:
            packed[name] = tensor.half()
            continue
        scale = (tensor.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float16).tiny).half()
        packed[name] = torch.round(tensor / scale.float()).clamp(-127, 127).to(torch.int8)
        packed[name + SCALE] = scale
    return packed


def pack_int4(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Matrices as 4-bit values (two a byte, the even column in the low nibble, stored as q + 8) with one fp16
    scale per 32 weights of a row; a matrix whose rows do not split into such groups stays int8. A 1.5B target's
    drafter is 35 MB in int8 and 19 MB like this."""
    grouped = {k: v for k, v in tensors.items() if v.dim() == 2 and v.shape[1] % GROUP == 0}
    packed = pack_int8({k: v for k, v in tensors.items() if k not in grouped})
    for name, tensor in grouped.items():
        groups = tensor.reshape(tensor.shape[0], -1, GROUP)
        scale = (groups.abs().amax(dim=2, keepdim=True) / 7).clamp(min=torch.finfo(torch.float16).tiny).half()
        q = (torch.round(groups / scale.float()).clamp(-7, 7) + 8).to(torch.uint8).reshape(tensor.shape)
        packed[name] = q[:, 0::2] | q[:, 1::2] << 4
        packed[name + SCALE4] = scale.squeeze(2)
    return packed


def unpack_int8(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The inverse of `pack_int8` and `pack_int4` (tensors without scales pass through); a packed matrix without
    its scales would load as raw integers and draft nonsense, so it is refused."""
    scales = {k.removesuffix(SCALE): v for k, v in state.items() if k.endswith(SCALE)}
    groups = {k.removesuffix(SCALE4): v for k, v in state.items() if k.endswith(SCALE4)}
    unscaled = [k for k, v in state.items() if v.dtype in (torch.int8, torch.uint8) and k not in scales | groups]
    if unscaled:
        suffix, form = (SCALE, "int8") if state[unscaled[0]].dtype == torch.int8 else (SCALE4, "int4")
        raise DovetailError(f"drafter weights at {source} are corrupt: packed tensor {unscaled[0]} has no "
                            f"{unscaled[0]}{suffix}; save the drafter again (`dovetail-onnx train --weights {form}`)")

    def weight(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in scales:
            return value.float() * scales[name].float()
        if name not in groups:
            return value
        q = torch.stack((value & 15, value >> 4), dim=2).reshape(value.shape[0], -1).float() - 8
        return (q.reshape(q.shape[0], -1, GROUP) * groups[name].float()[..., None]).reshape(q.shape)

    return {k: weight(k, v) for k, v in state.items() if not k.endswith((SCALE, SCALE4))}


def save_drafter(drafter: Drafter, folder: Path, weights: str = "fp32") -> None:
    """config.json + model.safetensors; `weights` is fp32, fp16 or int8 (`pack_int8`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(asdict(drafter.config), indent=2) + "\n")
    tensors = {k: v.detach().float() for k, v in drafter.trained_state_dict().items()}
    if weights == "int8":
        tensors = pack_int8(tensors)
    elif weights == "int4":
        tensors = pack_int4(tensors)
    elif weights == "fp16":
        tensors = {k: v.half() for k, v in tensors.items()}
    tensors["token_ranking"] = drafter.token_ranking.to(torch.int32)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def random_drafter(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_layers: int, fusion: str = "dgf"):
    """An untrained drafter, the same for every call (seeded without touching the caller's random state)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Drafter(DrafterConfig.for_target(target, tokenizer, fusion, num_layers)).attach_target(target)


def load_drafter(source: Path, target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Drafter:
    """Our folder (config.json + model.safetensors), or Dovetail's / EAGLE's `pytorch_model.bin`."""
    source = Path(source)
    if (source / "model.safetensors").exists():
        raw = json.loads((source / "config.json").read_text())
        config = DrafterConfig(**raw)
        state = unpack_int8(load_file(str(source / "model.safetensors")), source)
        check_match(config, target_fingerprint(target, tokenizer), source)
    else:
        weights = source / "pytorch_model.bin" if source.is_dir() else source
        if not weights.exists():
            raise DovetailError(
                f"no drafter at {source}: expected config.json + model.safetensors, or a reference pytorch_model.bin"
            )
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("embed_tokens.", "lm_head."))}
        fusion = "dgf" if "W_z" in state else "eagle" if "fc.weight" in state else None
        if fusion is None:
            raise DovetailError(f"{weights} is neither a Dovetail (W_z) nor an EAGLE (fc.weight) drafter")
        layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        config = DrafterConfig.for_target(target, tokenizer, fusion, layers)
        width = (state["W_1"] if fusion == "dgf" else state["fc.weight"]).shape[0]
        if width != config.hidden_size:
            raise DovetailError(
                f"drafter hidden size {width} does not match the target's {config.hidden_size}; "
                "use a drafter trained for this target"
            )
    drafter = Drafter(config)
    if "token_ranking" in state:
        drafter.token_ranking = state.pop("token_ranking").long()
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    # Layer 0's input norm is never used (first layer reads the fused input directly).
    missing = [k for k in missing if not k.startswith(("embed_tokens.", "lm_head.", "layers.0.input_layernorm."))]
    unexpected = [k for k in unexpected if not k.startswith("layers.0.input_layernorm.")]
    if missing or unexpected:
        raise DovetailError(
            f"drafter weights at {source} do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return drafter.attach_target(target)


def check_match(config: DrafterConfig, fingerprint: dict, source: Path | str) -> None:
    """Refuse a drafter trained for another target: it would only slow decoding down."""
    theirs = config.target
    for key in ("architecture", "hidden_size", "vocab_size", "vocab_sha256"):
        if key in theirs and theirs[key] != fingerprint[key]:
            raise DovetailError(
                f"drafter {source} was made for another target ({key}: {theirs[key]} vs {fingerprint[key]}); "
                "train one for this target with `dovetail-onnx train` or pass --drafter random"
            )
