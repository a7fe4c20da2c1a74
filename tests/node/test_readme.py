"""README.md documents what an operator needs: the two commands, every config key, every CLI command."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from config.load import SECTIONS
from config.settings import Settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"


def _config_reference_module():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_two_setup_free_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_readme_config_reference_is_generated_from_the_example_config() -> None:
    module = _config_reference_module()
    text = README.read_text(encoding="utf-8")
    expected = module.rendered_readme(text, (REPO / "config" / "edge-node.toml").read_text(encoding="utf-8"))
    assert text == expected, "README config reference is stale: run .venv/bin/python docs/config_reference.py"


def test_readme_lists_every_config_key_of_the_settings() -> None:
    text = README.read_text(encoding="utf-8")
    block = text[text.index("<!-- config-reference:start -->"): text.index("<!-- config-reference:end -->")]
    missing = []
    for section, (attr, cls) in SECTIONS.items():
        assert f"`[{section}]` key" in block, f"section [{section}] is missing from README"
        rows = block.split(f"`[{section}]` key", 1)[1].split("` key |", 1)[0]
        for field in dataclasses.fields(cls):
            if f"| `{field.name}` |" not in rows:
                missing.append(f"{section}.{field.name}")
    assert not missing, f"README lacks config keys {missing}; add them to config/edge-node.toml and regenerate"
    assert {attr for attr, _ in SECTIONS.values()} <= {f.name for f in dataclasses.fields(Settings)}


def test_render_table_lists_each_key_with_its_default_and_comment() -> None:
    module = _config_reference_module()
    table = module.render_table('[receiver]\n# Our AE title.\nae_title = "X"  # inline\n# A.\n# B.\nport = 1\n')
    assert "| `ae_title` | `\"X\"` | Our AE title. |" in table
    assert "| `port` | `1` | A. B. |" in table


def test_readme_documents_every_cli_command_and_exit_code() -> None:
    import argparse

    from node import cli

    text = README.read_text(encoding="utf-8")
    parser = cli.build_parser()
    commands = [
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    ]
    assert commands, "edge-node has no subcommands?"
    undocumented = [c for c in commands if f"| `edge-node {c}" not in text]
    assert not undocumented, f"README's command table lacks {undocumented}"
    block = text[text.index("<!-- cli-exit-codes:start -->"): text.index("<!-- cli-exit-codes:end -->")]
    codes = {value for name, value in vars(cli).items() if name.startswith("EXIT_")}
    # The top-level help lists every code, including those of subcommands implemented elsewhere.
    lines = cli.EPILOG.split("exit codes:", 1)[1].splitlines()
    codes |= {int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit()}
    assert codes, "node.cli defines no EXIT_* codes"
    missing = sorted(c for c in codes if f"| `{c}` |" not in block)
    assert not missing, f"README's exit code table lacks {missing}"
