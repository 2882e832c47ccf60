"""Export writes a self-contained folder, and exporting again into it leaves the same files."""
from __future__ import annotations

import json

from rich.console import Console

from dovetail_onnx.export.artifact import export_artifact
from dovetail_onnx.runtime.manifest import load_manifest


def test_re_export_into_the_same_folder_keeps_sizes(hf_dirs, tmp_path):
    quiet = Console(quiet=True)
    export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, console=quiet)
    sizes = {f.name: f.stat().st_size for f in (tmp_path / "a").iterdir()}
    export_artifact(hf_dirs["llama"], tmp_path / "a", "random", 1, console=quiet)
    assert {f.name: f.stat().st_size for f in (tmp_path / "a").iterdir()} == sizes
    manifest = json.loads((tmp_path / "a" / "dovetail.json").read_text())
    assert set(manifest["sha256"]) == {"target.onnx", "target.onnx.data", "target.rows.onnx", "drafter.onnx",
                                       "drafter.onnx.data", "drafter.int8.onnx", "drafter.int8.onnx.data", "tokenizer.json"}
    assert load_manifest(tmp_path / "a").drafter.cpu_file == "drafter.int8.onnx"
