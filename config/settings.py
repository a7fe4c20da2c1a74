"""Typed, frozen settings for every part of the node.

This module only declares the shape of the configuration and its defaults; reading TOML files and the
environment, and validating values, is `config.load`'s job. It imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class AllowedCaller:
    """One peer allowed to open associations: its calling AE title and, optionally, its host."""

    ae_title: str
    host: str | None = None


@dataclass(frozen=True, slots=True)
class ReceiverSettings:
    """``[receiver]``: the DICOM Storage SCP."""

    ae_title: str = "EDGE_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    allowed_callers: tuple[AllowedCaller, ...] = ()
    accept_any_caller: bool = False
    max_pdu_bytes: int = 131072
    processes: int = 0
    queue_size: int = 1024
    on_changed_content: str = "keep_newest"
    acse_timeout_seconds: float = 30.0
    dimse_timeout_seconds: float = 60.0
    network_timeout_seconds: float = 60.0
    engine: str = "fast"


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """``[storage]``: where the spool, the index database and results live."""

    data_dir: Path = Path("var")
    min_free_mb: int = 2048
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class CompletionSettings:
    """``[completion]``: when a study counts as complete."""

    quiet_seconds: float = 10.0
    max_wait_seconds: float = 900.0
    check_interval_seconds: float = 1.0


@dataclass(frozen=True, slots=True)
class ImportSettings:
    """``[import]``: the watched import folder, a second way in besides C-STORE."""

    enabled: bool = False
    dir: Path = Path("import")
    settle_seconds: float = 2.0


@dataclass(frozen=True, slots=True)
class PipelineSettings:
    """``[pipeline]``: the analysis worker."""

    enabled: bool = True
    device: str = "auto"
    model_dir: Path | None = None
    torch_threads: int = 0
    max_attempts: int = 3
    seg_series_description: str = ""
    sr_series_description: str = ""


@dataclass(frozen=True, slots=True)
class LogSettings:
    """``[log]``: application logging (stderr; journald adds time and unit)."""

    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole configuration of one node."""

    receiver: ReceiverSettings = field(default_factory=ReceiverSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    import_: ImportSettings = field(default_factory=ImportSettings)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)
    log: LogSettings = field(default_factory=LogSettings)
    source: Path | None = None
