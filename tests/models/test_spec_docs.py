"""docs/model-manifest.md documents every manifest key, network parameter and preprocessing operation."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from models.networks import ARCHITECTURES, CANDIDATE_ARCHITECTURES
from models.spec import KNOWN_PREPROCESS_OPS, MANIFEST_KEYS

DOC = Path(__file__).resolve().parents[2] / "docs" / "model-manifest.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def documented_names() -> list[str]:
    names = []
    for section, (required, optional) in MANIFEST_KEYS.items():
        for key in sorted(required | optional):
            names.append(f"`{section}.{key}`" if section not in ("", "code") else f"`{key}`")
    return names


@pytest.mark.parametrize("name", documented_names())
def test_every_manifest_key_is_documented(doc: str, name: str) -> None:
    assert f"| {name} |" in doc, f"{name} is missing from {DOC.name}"


@pytest.mark.parametrize("architecture", sorted({**ARCHITECTURES, **CANDIDATE_ARCHITECTURES}))
def test_every_network_parameter_is_documented(doc: str, architecture: str) -> None:
    network = {**ARCHITECTURES, **CANDIDATE_ARCHITECTURES}[architecture]
    params = set(inspect.signature(network.__init__).parameters) - {"self"}
    section = doc.split(f"`{architecture}` parameters:", 1)[1].split("\n\n", 1)[0]
    missing = sorted(p for p in params if f"`{p}`" not in section)
    assert not missing, f"{architecture} parameters missing from {DOC.name}: {missing}"


@pytest.mark.parametrize("op", KNOWN_PREPROCESS_OPS)
def test_every_preprocessing_operation_is_documented(doc: str, op: str) -> None:
    assert f"`{op}`" in doc
