"""`dovetail-onnx export`: target + drafter → an artifact folder the runtime can load alone."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dovetail_onnx.export.drafter import Drafter, load_drafter, random_drafter, target_fingerprint, target_source
from dovetail_onnx.export.drafter_export import CPU_FILE, CPU_KERNEL_FILE, export_cpu_drafter, export_drafter
from dovetail_onnx.export.load import EMBEDDED, gguf_file, load_target
from dovetail_onnx.export.target import VERIFY, export_target
from dovetail_onnx.runtime.errors import DovetailError
from dovetail_onnx.runtime.manifest import FORMAT_VERSION, MANIFEST, MAX_TOP_K, GraphSpec, TreeSettings, export_tree, \
    sha256_of

SHIPPED = Path(__file__).parent / "drafters"
# The copied chain an artifact without a drafter verifies by default (export --tune measures others).
LOOKUP_DEPTH = 4


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a turn: config, generation config and tokenizer can each name some."""
    found: set[int] = set()
    for value in (model.config.eos_token_id, getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            found.update([value] if isinstance(value, int) else value)
    return sorted(found)


def build_manifest(model, tokenizer, target: GraphSpec, drafter: Drafter | None, tree: TreeSettings,
                   draft_vocab: int, cpu_drafter: bool, folder: Path, draft_model: GraphSpec | None = None,
                   draft_context: int | None = None, drafter_kernel_file: str | None = None) -> dict:
    c, d = model.config, drafter and drafter.config
    graphs = ["target.onnx"] + (["drafter.onnx"] + ([CPU_FILE] if cpu_drafter else [])) * bool(drafter)
    graphs += [draft_model.file] if draft_model else []
    kernel_files = [spec.kernel_file for spec in (target, draft_model) if spec and spec.kernel_file]
    kernel_files += [drafter_kernel_file] if drafter_kernel_file else []
    files = [f for g in graphs for f in (g, g + ".data")] + kernel_files + ["tokenizer.json"]
    return {
        "format_version": FORMAT_VERSION,
        "target": target.model_dump(exclude_none=True),
        "draft_model": draft_model and draft_model.model_dump(exclude_none=True),
        "drafter": d and {"file": "drafter.onnx", "num_layers": d.num_layers, "kv_heads": d.num_key_value_heads,
                          "kv_width": d.num_key_value_heads * d.head_dim, "hidden_size": d.hidden_size,
                          "vocab_size": d.vocab_size, "cpu_file": CPU_FILE if cpu_drafter else None,
                          "kernel_file": drafter_kernel_file},
        "max_top_k": MAX_TOP_K,
        "fusion": d and d.fusion,
        "draft_vocab_size": draft_vocab or c.vocab_size,
        "architecture": type(model).__name__,
        "eos_token_ids": eos_ids(model, tokenizer),
        "special_tokens": {k: str(v) for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token)) if v},
        "chat_template": tokenizer.chat_template,
        # A draft model reads the whole text too: the shorter of the two contexts bounds a generation.
        "context_length": min(c.max_position_embeddings, draft_context or c.max_position_embeddings),
        "tree": asdict(tree),
        "drafter_target": d and d.target,
        "source": target_source(model, tokenizer),
        "sha256": {name: sha256_of(folder / name) for name in files},
    }


def export_artifact(target: str | Path, out: Path, drafter: str | None, drafter_layers: int = 1,
                    tree: TreeSettings | None = None, draft_vocab: int | None = None,
                    cpu_drafter: bool = True, precision: str = "fp32", console: Console | None = None,
                    block_size: int | None = None, lookup_depth: int = LOOKUP_DEPTH,
                    draft_model: str | Path | None = None) -> dict:
    """Write target.onnx, drafter.onnx (+ the CPU drafter), tokenizer files and dovetail.json into `out`.

    `tree`: the default draft tree (None: `export_tree`'s for `precision`).
    `drafter`: a drafter folder or file, 'random', 'lookup' (none: prompt lookup drafts alone), or None (the shipped
    drafter trained for this target; prompt lookup alone where none is). `draft_vocab`: tokens the drafter's head
    scores (0: all; None: the drafter's own setting).
    `cpu_drafter`: also write the 4-bit drafter the runtime uses when the drafter runs on a CPU (`quantize_int4`).
    `precision`: the target's weights, fp32, int8, int4 or gguf (see export/target.py); `block_size`: an int8 or
    int4 target's weights per scale. `lookup_depth`: the default chain when prompt lookup drafts alone.
    `draft_model`: a standalone small LM of the target's tokenizer (a Hugging Face folder, a .gguf file or an
    embedded name) that drafts instead of a trained drafter; it gets the target's precision where it can.
    """
    if draft_model is not None and drafter not in (None, "lookup"):
        raise DovetailError("--draft-model drafts instead of a trained drafter; drop --drafter")
    if block_size is not None and precision in ("fp32", "gguf"):
        fix = {"fp32": "add --precision int8 or int4, or drop it", "gguf": "gguf keeps the file's blocks; drop it"}
        raise DovetailError(f"--block-size applies to int8 and int4 targets, not {precision}: {fix[precision]}")
    tree = tree or export_tree(VERIFY[precision])
    console = console or Console(stderr=True)
    started = time.perf_counter()
    # --precision gguf reads the target's GGUF file (joined from its parts) until its blocks are in the graph.
    with gguf_file(target) if precision == "gguf" else nullcontext() as gguf:
        with console.status("loading target") as status:
            model, tokenizer = load_target(target)
            status.update("preparing drafter")
            draft = None if draft_model is not None else make_drafter(drafter, drafter_layers, model, tokenizer,
                                                                      console, precision)
            out.mkdir(parents=True, exist_ok=True)
            # Until the new manifest is written the folder is no artifact: an interrupted export is never
            # mistaken for a whole one, nor an old manifest paired with half-written graphs.
            (out / MANIFEST).unlink(missing_ok=True)
            status.update(f"building target.onnx ({precision}) and checking it")
            target_graph = export_target(model, tokenizer, out / "target.onnx", precision, block_size, gguf)
            drafting = draft or draft_model is not None
            # The stored tree is for the best graph the artifact has: a chain where no graph verifies trees, or
            # where prompt lookup alone drafts (a copy is a chain).
            if not drafting:
                tree = replace(tree, depth=lookup_depth).on("chain")
            tree = tree.on(target_graph.kernel_verify or target_graph.verify)
            for stale in ("drafter.onnx", "drafter.onnx.data", "drafter.int8.onnx", "drafter.int8.onnx.data",
                          CPU_FILE, f"{CPU_FILE}.data", CPU_KERNEL_FILE, "draft.onnx", "draft.onnx.data",
                          "draft.rows.onnx"):
                (out / stale).unlink(missing_ok=True)
            draft_graph, draft_context, drafter_kernel_file = None, None, None
            if draft_model is not None:
                status.update("building draft.onnx (the draft model) and checking it")
                draft_graph, draft_context = export_draft_model(draft_model, model, tokenizer, out / "draft.onnx",
                                                                precision, block_size, console)
            if draft:
                status.update("exporting drafter.onnx")
                draft_vocab = draft.config.draft_vocab_size if draft_vocab is None else draft_vocab
                feeds = export_drafter(draft, out / "drafter.onnx", MAX_TOP_K, draft_vocab)
                if cpu_drafter:
                    status.update("quantizing the CPU drafter (4 bits)")
                    drafter_kernel_file = export_cpu_drafter(out / "drafter.onnx", feeds)
            status.update("writing tokenizer and manifest")
            tokenizer.save_pretrained(out)
            manifest = build_manifest(model, tokenizer, target_graph, draft, tree, draft_vocab, cpu_drafter, out,
                                      draft_graph, draft_context, drafter_kernel_file)
            partial = out / f"{MANIFEST}.partial"
            partial.write_text(json.dumps(manifest, indent=2) + "\n")
            partial.replace(out / MANIFEST)
    console.print(f"exported {out} in {time.perf_counter() - started:.1f} s")
    return manifest


def export_draft_model(source: str | Path, target: PreTrainedModel, tokenizer, path: Path, precision: str,
                       block_size: int | None, console: Console) -> tuple[GraphSpec, int]:
    """The draft model's graph, in the target's contract and precision (a gguf target's draft model keeps its own
    file's blocks when it is a GGUF too, else it takes int4), and its context length. Its tokens must be the
    target's: the same vocabulary, every string at the same id."""
    draft, draft_tokenizer = load_target(source)
    if draft.config.vocab_size != target.config.vocab_size or draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise DovetailError(f"the draft model {source} has another tokenizer than the target (vocabulary "
                            f"{len(draft_tokenizer)} against {len(tokenizer)}, or the same ids for other strings); "
                            "pick a draft model of the target's family, e.g. a smaller size of it")
    if precision == "gguf" and not (str(source) in EMBEDDED or Path(source).suffix == ".gguf"):
        console.print(f"draft model: {source} is no GGUF, so it takes int4 weights", soft_wrap=True)
        precision, block_size = "int4", None
    with gguf_file(source) if precision == "gguf" else nullcontext() as gguf:
        return (export_target(draft, draft_tokenizer, path, precision, block_size, gguf),
                draft.config.max_position_embeddings)


def shipped_drafter(model, tokenizer, precision: str = "fp32") -> Path | None:
    """The drafter shipped in this package that was trained for this very target: the one distilled from a target
    of this precision if there is one, else the one distilled from fp32, else any (a 1.5B target's was distilled
    from its GGUF artifact: its features are closer to another precision's than no drafter is); None when none
    was."""
    fingerprint = target_fingerprint(model, tokenizer)
    made = {}
    for config in sorted(SHIPPED.glob("*/config.json")):
        raw = json.loads(config.read_text())
        if raw.get("target") == fingerprint:
            made.setdefault(raw.get("teacher_precision", "fp32"), config.parent)
    return made.get(precision) or made.get("fp32") or next(iter(made.values()), None)


def make_drafter(spec: str | None, layers: int, model, tokenizer, console: Console,
                 precision: str = "fp32") -> Drafter | None:
    """The drafter to export, or None to draft by prompt lookup alone."""
    if spec is None and (folder := shipped_drafter(model, tokenizer, precision)):
        console.print(f"drafter: shipped {folder.name}")
        return load_drafter(folder, model, tokenizer)
    if spec is None:
        console.print("drafter: none trained for this target, so it drafts by prompt lookup (copies from the prompt "
                      "and the text so far); for a trained drafter run `dovetail-onnx train TARGET -o DIR` and export "
                      "with --drafter DIR", soft_wrap=True)
        return None
    if spec == "lookup":
        console.print("drafter: none, it drafts by prompt lookup (copies from the prompt and the text so far)",
                      soft_wrap=True)
        return None
    if spec == "random":
        console.print(f"[yellow]warning:[/] untrained drafter ({layers} layers): output stays exact, but almost "
                      "no draft token is accepted; use it for tests and smoke runs only")
        return random_drafter(model, tokenizer, layers)
    return load_drafter(Path(spec), model, tokenizer)
