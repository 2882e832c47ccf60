"""Property tests: whatever the manifest, options, prompt bytes or tree settings, the CLI and API either
run correctly or stop with one clear line (exit 1, or 2 for a usage error) — never a traceback, a hang
or silently wrong output. Seeded and bounded so CI stays fast."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clirun import edited_artifact, error_line
from dovetail_onnx.cli.main import main
from dovetail_onnx.runtime import DovetailError, GeneratorParams, TreeSettings, generate

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PROMPT = "tell me"


@pytest.fixture(scope="module")
def greedy(models):
    """The target's own greedy tokens for PROMPT (chat template), up to EOS."""
    model = models["llama"]
    tokens, _ = generate(model, model.encode_prompt(PROMPT), GeneratorParams(max_new_tokens=400, mode="target-only"))
    return tokens


def run(args: list[str], input: bytes | None = None):
    result = CliRunner().invoke(main, args, input=input)
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.output, result.exception)
    event(f"exit {result.exit_code}")
    if result.exit_code:
        error_line(result)
    return result


def leaf_paths(value, prefix=()) -> list[tuple]:
    if isinstance(value, dict):
        return [prefix] * bool(prefix) + [p for k, v in value.items() for p in leaf_paths(v, (*prefix, k))]
    return [prefix]


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=2), max_leaves=4)
# Fields whose valid changes legitimately change the output; any other accepted edit must not.
CHANGES_OUTPUT = {"eos_token_ids", "chat_template"}


@SETTINGS
@given(data=st.data())
def test_any_manifest_edit_is_refused_in_one_line_or_changes_nothing(data, artifacts, greedy, tmp_path_factory):
    source = artifacts["llama"]
    raw = json.loads((source / "dovetail.json").read_text())
    path = data.draw(st.sampled_from(leaf_paths(raw)), label="field")
    delete = data.draw(st.booleans(), label="delete")
    value = None if delete else data.draw(ANY_JSON | st.integers(0, 600), label="value")

    def edit(manifest: dict) -> None:
        *parents, last = path
        for key in parents:
            manifest = manifest[key]
        manifest.pop(last) if delete else manifest.__setitem__(last, value)

    folder = edited_artifact(source, tmp_path_factory.mktemp("edited"), edit)
    result = run(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6", "--json",
                  "--draft-device", "cpu"])
    if result.exit_code == 0 and path[0] not in CHANGES_OUTPUT:
        assert json.loads(result.stdout)["token_ids"] == greedy[:6], (path, value)


OPTION_VALUES = st.sampled_from(["0", "-1", "1", "2", "3", "16", "17", "127", "128", "129", "1000000", "2e0", "nan",
                                 "inf", "-inf", "1e309", "0.5", "abc", "", " 4", "18446744073709551616"]) \
    | st.integers(-3, 40).map(str) | st.floats(allow_nan=True).map(str)
OPTIONS = ["--max-new-tokens", "--top-k", "--depth", "--tree-tokens", "--temperature", "--top-p", "--sample-top-k",
           "--seed", "--threads"]


@SETTINGS
@given(chosen=st.dictionaries(st.sampled_from(OPTIONS), OPTION_VALUES, max_size=4))
def test_any_option_values_run_correctly_or_fail_in_one_line(chosen, artifacts, greedy):
    args = [a for option, value in chosen.items() for a in (option, value)]
    result = run(["generate", str(artifacts["llama"]), "--prompt", PROMPT, "--json", "--draft-device", "cpu", *args])
    if result.exit_code:
        return
    tokens = json.loads(result.stdout)["token_ids"]
    limit = int(chosen.get("--max-new-tokens", 256))
    if float(chosen.get("--temperature", 0)) == 0:
        assert tokens == greedy[:limit]
    else:
        assert 1 <= len(tokens) <= limit and all(0 <= t < 320 for t in tokens)


@SETTINGS
@given(data=st.binary(max_size=48), via_stdin=st.booleans())
def test_any_prompt_bytes_run_or_fail_in_one_line(data, via_stdin, artifacts, tmp_path_factory):
    args = ["generate", str(artifacts["llama"]), "--max-new-tokens", "2", "--mode", "target-only", "--json"]
    if via_stdin:
        result = run(args, input=data)
    else:
        file = tmp_path_factory.mktemp("prompt") / "p.txt"
        file.write_bytes(data)
        result = run([*args, "--prompt-file", str(file)])
    try:
        usable = bool(data.decode("utf-8").strip())
    except UnicodeDecodeError:
        usable = False
    assert (result.exit_code == 0) == usable, result.output


@SETTINGS
@given(top_k=st.integers(-2, 20), depth=st.integers(-2, 140), total=st.integers(-2, 140))
def test_any_tree_settings_are_lossless_or_refused(top_k, depth, total, models, greedy):
    model = models["llama"]
    params = GeneratorParams(max_new_tokens=12, tree=TreeSettings(top_k, depth, total))
    try:
        tokens, _ = generate(model, model.encode_prompt(PROMPT), params)
    except DovetailError as exc:
        event("refused")
        assert "\n" not in str(exc)
        return
    event("ran")
    assert tokens == greedy[:12]
