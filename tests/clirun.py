"""Running the CLI in-process and asserting its one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from dovetail_onnx.cli.main import main


def error_line(result) -> str:
    """The single stderr line of a failed run (a drafter fallback note may come first)."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def fails(args: list[str], match: str, code: int = 1, input: str | bytes | None = None) -> str:
    """Run the CLI; it must exit `code` (1: a DovetailError, 2: a usage error) with one line containing `match`."""
    result = CliRunner().invoke(main, args, input=input)
    assert result.exit_code == code, (result.output, result.exception)
    line = error_line(result)
    assert match in line, line
    return line


def edited_artifact(source: Path, folder: Path, edit=None, manifest_text: str | bytes | None = None) -> Path:
    """A copy of an artifact (graphs linked, not copied) whose manifest is edited by `edit(dict)` or replaced."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "dovetail.json":
            (folder / file.name).symlink_to(file.resolve())
    if manifest_text is None:
        raw = json.loads((source / "dovetail.json").read_text())
        edit(raw)
        manifest_text = json.dumps(raw)
    target = folder / "dovetail.json"
    target.write_bytes(manifest_text) if isinstance(manifest_text, bytes) else target.write_text(manifest_text)
    return folder
