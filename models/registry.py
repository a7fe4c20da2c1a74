"""The one list of models this node can run: bundles discovered in a model directory.

A bundle is a sub-folder holding ``model.toml`` (see `models.spec`). Discovery parses each manifest and
checks that its weights file exists; a bad bundle is logged with the reason, recorded in `problems`
and skipped, so a broken or half-copied bundle never stops the node. The registry reads manifests only:
it imports neither torch nor the networks (the receiver routes studies with it), and it never checks
hashes (the loader does, when the weights are read).
"""

from __future__ import annotations

import builtins
import logging
from dataclasses import dataclass
from pathlib import Path

from models.spec import MANIFEST_NAME, ModelError, ModelSpec, SeriesCandidate, SpecError, load_spec

log = logging.getLogger(__name__)


class ModelNotFoundError(ModelError, LookupError):
    """No model of that name in the registry; the message lists the models there are."""


@dataclass(frozen=True, slots=True)
class BundleProblem:
    """A bundle that was skipped: its folder and why."""

    path: Path
    reason: str


def default_model_dir() -> Path:
    """The bundles shipped inside the ``models`` package (one sub-folder per model)."""
    return Path(__file__).resolve().parent


class ModelRegistry:
    """Bundles found in ``model_dir`` (default: `default_model_dir`), keyed by model name.

    Parameters
    ----------
    model_dir
        A folder of bundles, or a single bundle folder (holding ``model.toml`` itself). None = the
        shipped bundles.
    """

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.problems: list[BundleProblem] = []
        self._models: dict[str, ModelSpec] = {}
        self._discover()

    def _discover(self) -> None:
        if not self.model_dir.is_dir():
            self._problem(self.model_dir, "model directory does not exist")
            return
        if (self.model_dir / MANIFEST_NAME).is_file():
            folders = [self.model_dir]
        else:
            folders = sorted(p for p in self.model_dir.iterdir()
                             if p.is_dir() and (p / MANIFEST_NAME).is_file())
        for folder in folders:
            try:
                spec = load_spec(folder)
            except SpecError as exc:
                self._problem(folder, str(exc))
                continue
            if not spec.weights_path.is_file():
                self._problem(folder, f"weights file {spec.weights.file} is missing")
                continue
            if spec.candidates is not None and not (folder / spec.candidates.weights.file).is_file():
                self._problem(folder, f"candidate stage weights file {spec.candidates.weights.file} is missing")
                continue
            if spec.name in self._models:
                self._problem(folder, f"model name {spec.name} is already provided by "
                                      f"{self._models[spec.name].bundle_dir}")
                continue
            self._models[spec.name] = spec
            log.info("event=model_found model=%s version=%s bundle=%s", spec.name, spec.version, folder)
        if not self._models:
            log.warning("event=no_models model_dir=%s problems=%d", self.model_dir, len(self.problems))

    def _problem(self, path: Path, reason: str) -> None:
        self.problems.append(BundleProblem(path=path, reason=reason))
        log.warning("event=model_bundle_skipped bundle=%s reason=%s", path, reason)

    def get(self, name: str) -> ModelSpec:
        """The model of that name.

        Raises
        ------
        ModelNotFoundError
            Naming the models there are (and the skipped bundles, if any).
        """
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(sorted(self._models)) or "none"
            skipped = f"; {len(self.problems)} bundle(s) skipped, see the log" if self.problems else ""
            raise ModelNotFoundError(f"no model named {name!r} in {self.model_dir} "
                                     f"(available: {known}{skipped})") from None

    def list(self) -> builtins.list[ModelSpec]:
        """All usable models, sorted by name."""
        return [self._models[name] for name in sorted(self._models)]

    def select(self, candidate: SeriesCandidate) -> builtins.list[ModelSpec]:
        """The models whose series criteria accept the series (pure; sorted by name)."""
        return [spec for spec in self.list() if spec.accepts(candidate)[0]]

    def decisions(self, candidate: SeriesCandidate) -> builtins.list[tuple[ModelSpec, bool, str]]:
        """Every model's decision on the series with its reason (for logs and the analyze CLI)."""
        return [(spec, *spec.accepts(candidate)) for spec in self.list()]

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models
