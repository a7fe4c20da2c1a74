"""The installed ``edge-node`` command: `node.cli.console_main` (exit code, output, quick exit)."""

from __future__ import annotations

import gc
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from node import cli

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_command_is_console_main() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["edge-node"] == "node.cli:console_main"


def test_console_main_returns_mains_exit_code_and_freezes_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "main", lambda: 4)
    gc.unfreeze()
    try:
        assert cli.console_main() == 4
        assert gc.get_freeze_count() > 0  # the exit skips the walk over these objects
    finally:
        gc.unfreeze()


def test_the_command_run_as_a_program_keeps_its_output_and_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[receiver]\nport = 'eleven'\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "node.cli", "check-config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == cli.main(["check-config", str(bad)]) != 0
    assert "port" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "node.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0 and "analyze" in proc.stdout
