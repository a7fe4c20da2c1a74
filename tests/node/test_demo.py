"""`make demo` (``python -m node.demo``) works end to end: every instance stored, the study complete."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from node.demo import override_toml, write_demo_config

REPO = Path(__file__).resolve().parents[2]
DEMO_DEADLINE_SECONDS = 60


def _run_demo(*args: str) -> tuple[int, str]:
    """Run ``python -m node.demo ARGS`` with a deadline; return its exit status and output."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    demo = subprocess.Popen(
        [sys.executable, "-m", "node.demo", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = demo.communicate(timeout=DEMO_DEADLINE_SECONDS)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the demo stop its receiver; only then give up on it.
        demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=40)
        pytest.fail(f"node.demo {' '.join(args)} took longer than {DEMO_DEADLINE_SECONDS} s:\n{output}")
    return demo.returncode, output


def test_demo_config_is_the_example_config_with_only_the_demo_changes(tmp_path: Path) -> None:
    from config.load import load_settings

    config = tmp_path / "edge-node.toml"
    write_demo_config(config, tmp_path / "var")
    settings = load_settings(config)
    assert settings.receiver.host == "127.0.0.1"
    assert settings.receiver.port == 0
    assert [c.ae_title for c in settings.receiver.allowed_callers] == ["DEMO_SCU"]
    assert settings.storage.data_dir == tmp_path / "var"
    assert settings.storage.fsync is True
    assert settings.completion.quiet_seconds == 3
    assert settings.receiver.ae_title == "EDGE_NODE"


def test_override_toml_replaces_a_key_only_in_its_own_section() -> None:
    text = "[a]\n# comment\nenabled = true\n\n[b]\nenabled = true\n"
    out = override_toml(text, "b", "enabled", "false")
    assert out == "[a]\n# comment\nenabled = true\n\n[b]\nenabled = false\n"
    added = override_toml(text, "a", "port", "0")
    assert added.startswith("[a]\n# comment\nenabled = true\nport = 0\n\n[b]")


@pytest.mark.slow
def test_demo_stores_every_instance_completes_the_study_and_exits_0(tmp_path: Path) -> None:
    returncode, output = _run_demo("--data-dir", str(tmp_path / "demo"))
    assert returncode == 0, output
    assert "40 acknowledged with status 0x0000" in output, output
    assert re.search(r"stored: 40/40 instances indexed; study complete", output), output
    assert "stopped cleanly on SIGTERM (exit status 0)" in output, output
    assert "demo OK" in output
    # The receiver's own log names no patient.
    log = (tmp_path / "demo" / "edge-node.log").read_text(errors="replace")
    assert "DEMO^PHANTOM" not in log and "DEMO0001" not in log


@pytest.mark.slow
def test_demo_with_analyze_prints_the_findings_and_the_result_files(tmp_path: Path) -> None:
    from tests.models.tiny_bundle import make_tiny_bundle

    models = tmp_path / "models"
    make_tiny_bundle(models / "tiny")
    returncode, output = _run_demo("--slices", "20", "--size", "96", "--analyze",
                                   "--model-dir", str(models), "--data-dir", str(tmp_path / "demo"))
    assert returncode == 0, output
    assert "model tiny_test_model" in output, output
    seg = re.search(r"SEG (\S+\.dcm)", output)
    sr = re.search(r"SR  (\S+\.dcm)", output)
    assert seg and Path(seg.group(1)).is_file(), output
    assert sr and Path(sr.group(1)).is_file(), output
