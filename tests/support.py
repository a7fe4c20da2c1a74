"""Helpers shared by every test package (import as `from tests.support import ...`).

`require_tool` is the one place that decides what a missing external tool means: a skip on a user's
machine, a failure under CI (CI=true), where .ci/run installs dcmtk, dicom3tools and orthanc.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Return the path of an external command; skip the test without it, or fail under CI=true."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (Debian: dcmtk, dicom3tools or orthanc)"
        if in_ci():
            pytest.fail(f"{message}; CI=true requires it", pytrace=False)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool_env() -> dict[str, str]:
    """Environment for DCMTK/Orthanc child processes: Nagle off (see the developers' guide)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env
