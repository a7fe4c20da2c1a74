"""The example config documents every settings field, and every validation error exits 2 naming the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from config.load import SECTIONS, default_config_path, load_settings
from node.cli import main


def _documented_keys(text: str) -> dict[tuple[str, str], bool]:
    """(section, key) -> whether a comment line directly precedes it (or a comment block for a group)."""
    found: dict[tuple[str, str], bool] = {}
    section = ""
    previous_is_comment_or_key = False
    last_comment = False
    for line in text.splitlines():
        stripped = line.strip()
        m = re.match(r"^\[(\w+)\]$", stripped)
        if m:
            section, last_comment = m.group(1), False
            continue
        if stripped.startswith("#"):
            last_comment = True
            continue
        m = re.match(r"^(\w+)\s*=", stripped)
        if m and section:
            # consecutive keys under one comment block share it (e.g. the two series descriptions)
            found[(section, m.group(1))] = last_comment or previous_is_comment_or_key
            previous_is_comment_or_key = found[(section, m.group(1))]
            last_comment = False
            continue
        if not stripped:
            last_comment = False
            previous_is_comment_or_key = False
    return found


def test_example_config_documents_every_settings_field_with_a_comment():
    text = default_config_path().read_text(encoding="utf-8")
    documented = _documented_keys(text)
    for section, (attr, cls) in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert (section, field.name) in documented, f"[{section}] {field.name} is missing from edge-node.toml"
            assert documented[(section, field.name)], f"[{section}] {field.name} has no comment in edge-node.toml"
    assert set(documented) == {(s, f.name) for s, (_, c) in SECTIONS.items() for f in dataclasses.fields(c)}


def test_example_config_loads_and_holds_the_issue_keys(tmp_path):
    raw = tomllib.loads(default_config_path().read_text(encoding="utf-8"))
    for key in ("ae_title", "host", "port", "max_associations", "allowed_callers", "accept_any_caller"):
        assert key in raw["receiver"]
    assert {"data_dir", "min_free_mb"} <= set(raw["storage"])
    assert {"quiet_seconds", "max_wait_seconds"} <= set(raw["completion"])
    settings = load_settings(default_config_path(), env={"EDGE_NODE_STORAGE_DATA_DIR": str(tmp_path / "var")})
    assert settings.receiver.ae_title == "EDGE_NODE"


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n' + body, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[receiver]\nae_tittle = \"X\"\n", "receiver.ae_tittle"),
        ("[receiver]\nae_title = \"ABCDEFGHIJKLMNOPQ\"\n", "receiver.ae_title"),
        ("[receiver]\nae_title = \"EDGE\\\\NODE\"\n", "receiver.ae_title"),
        ("[receiver]\nport = 65536\n", "receiver.port"),
        ("[receiver]\nport = -1\n", "receiver.port"),
        ("[receiver]\nallowed_callers = [ { ae_title = \"A_VERY_LONG_AE_TITLE_X\" } ]\n", "receiver.allowed_callers[0].ae_title"),
        ("[completion]\nquiet_seconds = 0\n", "completion.quiet_seconds"),
        ("[nonsense]\nx = 1\n", "[nonsense]"),
    ],
)
def test_check_config_exits_2_and_names_the_key(tmp_path, capsys, body, key):
    assert main(["check-config", str(_write(tmp_path, body))]) == 2
    assert key in capsys.readouterr().err


def test_check_config_exits_2_for_an_unwritable_data_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tmp_path / "bad.toml"
    path.write_text(f'[storage]\ndata_dir = "{blocker / "data"}"\n', encoding="utf-8")
    assert main(["check-config", str(path)]) == 2
    assert "storage.data_dir" in capsys.readouterr().err


def test_check_config_accepts_a_good_file(tmp_path, capsys):
    assert main(["check-config", str(_write(tmp_path, "[receiver]\nport = 104\n"))]) == 0
    assert "ok" in capsys.readouterr().out


def test_help_documents_every_command_and_the_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "status", "echo", "check-config", "analyze"):
        assert command in out
    for code in ("0 ", "1 ", "2 ", "3 "):
        assert f"  {code}" in out


def test_processes_zero_means_two_per_core_bounded_by_max_associations(tmp_path):
    from node.daemon import receiver_process_count

    def count(cores, **receiver):
        path = tmp_path / "p.toml"
        body = "".join(f"{k} = {v}\n" for k, v in receiver.items())
        path.write_text(f'[receiver]\n{body}[storage]\ndata_dir = "{tmp_path / "d"}"\n', encoding="utf-8")
        return receiver_process_count(load_settings(path, env={}), cpu_count=cores)

    assert count(1) == 4
    assert count(2) == 4
    assert count(8) == 16
    assert count(8, max_associations=6) == 6
    assert count(8, processes=3) == 3


def test_analyze_delegates_to_the_pipeline_module(monkeypatch):
    import sys
    import types

    calls = {}
    fake = types.ModuleType("pipeline.analyze")
    fake.add_arguments = lambda parser: parser.add_argument("paths", nargs="+")
    fake.run = lambda args: calls.setdefault("paths", args.paths) and 0
    monkeypatch.setitem(sys.modules, "pipeline.analyze", fake)
    assert main(["analyze", "a.dcm", "b"]) == 0
    assert calls["paths"] == ["a.dcm", "b"]


def test_analyze_without_the_pipeline_exits_1_with_a_clear_message(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "pipeline.analyze", None)  # import raises ImportError
    assert main(["analyze", "x"]) == 1
    assert "analysis pipeline is not available" in capsys.readouterr().err
