"""Model manifest schema (``model.toml``): the declarative description that travels with the weights.

Only data classes and their parsing live here; nothing of DICOM networking, nothing of `pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CodeSpec:
    """A coded concept (SNOMED CT, DCM, ...): value, scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """One output label of a model, as the manifest declares it (``[[labels]]`` in model.toml)."""

    value: int
    name: str
    category: CodeSpec
    type: CodeSpec
    color_rgb: tuple[int, int, int]
    threshold: float = 0.5
    min_size_mm3: float = 0.0
    is_finding: bool = False
    finding_site: CodeSpec | None = None
