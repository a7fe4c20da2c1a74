"""Read a TOML config file plus ``EDGE_NODE_*`` environment overrides into validated `Settings`.

Every problem is reported as a `ConfigError` whose message names the key and the fix; unknown keys are
errors (a typo must never silently fall back to a default). This is the only module that reads the
environment. It imports nothing of ours but `config.settings`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from config.settings import (
    AllowedCaller,
    CompletionSettings,
    ImportSettings,
    LogSettings,
    PipelineSettings,
    ReceiverSettings,
    Settings,
    StorageSettings,
)

ENV_PREFIX = "EDGE_NODE_"

#: TOML section name -> (Settings attribute, section dataclass)
SECTIONS: dict[str, tuple[str, type]] = {
    "receiver": ("receiver", ReceiverSettings),
    "storage": ("storage", StorageSettings),
    "completion": ("completion", CompletionSettings),
    "import": ("import_", ImportSettings),
    "pipeline": ("pipeline", PipelineSettings),
    "log": ("log", LogSettings),
}

_PATH_KEYS = {("storage", "data_dir"), ("import", "dir"), ("pipeline", "model_dir")}
_OPTIONAL_PATH_KEYS = {("pipeline", "model_dir")}
_AE_CHARS = re.compile(r"^[\x20-\x7e]*$")
CHANGED_CONTENT_POLICIES = ("keep_newest", "keep_first", "reject")
RECEIVER_ENGINES = ("fast", "pynetdicom")
DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and how to fix it."""


def default_config_path() -> Path:
    """The annotated example config shipped with the package (``config/edge-node.toml``)."""
    return Path(__file__).with_name("edge-node.toml")


def load_settings(
    path: Path | str | None,
    env: Mapping[str, str] | None = None,
    *,
    check_dirs: bool = True,
) -> Settings:
    """Load, override from the environment and validate.

    Parameters
    ----------
    path
        TOML file; ``None`` uses the built-in defaults only.
    env
        Environment to read ``EDGE_NODE_<SECTION>_<KEY>`` overrides from (default ``os.environ``).
    check_dirs
        Create the data directory when missing and check that it is writable.

    Raises
    ------
    ConfigError
        Unreadable file, TOML syntax error, unknown key, wrong type or invalid value.
    """
    raw: dict[str, Any] = {}
    source: Path | None = None
    if path is not None:
        source = Path(path)
        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist; pass an existing file with --config") from None
        except PermissionError:
            raise ConfigError(f"config file {source} is not readable; fix its permissions") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    raw = _apply_env(raw, os.environ if env is None else env)
    settings = _build(raw, source)
    validate(settings, check_dirs=check_dirs)
    return settings


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        for section in SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                merged.setdefault(section, {})
                if not isinstance(merged[section], dict):
                    raise ConfigError(f"[{section}] must be a table")
                merged[section][key] = _parse_env_value(section, key, value)
                break
        else:
            raise ConfigError(
                f"environment variable {name} names no config key; use {ENV_PREFIX}<SECTION>_<KEY> "
                f"with SECTION one of {', '.join(s.upper() for s in SECTIONS)}"
            )
    return merged


def _parse_env_value(section: str, key: str, value: str) -> Any:
    """Environment values are TOML literals when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _build(raw: dict[str, Any], source: Path | None) -> Settings:
    sections: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown section [{section}]; known sections: {', '.join(SECTIONS)} — remove or rename it"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of keys, not {type(table).__name__}")
        attr, cls = SECTIONS[section]
        sections[attr] = _build_section(section, cls, table)
    return Settings(**sections, source=source)


def _build_section(section: str, cls: type, table: dict[str, Any]) -> Any:
    defaults = cls()
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(
                f"unknown key {section}.{key}; known keys in [{section}]: {', '.join(known)} — "
                "remove it or fix the spelling"
            )
        default = getattr(defaults, key)
        values[key] = _coerce(section, key, value, default)
    return cls(**values)


def _coerce(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"{section}.{key}"
    if (section, key) == ("receiver", "allowed_callers"):
        return _callers(value)
    if (section, key) in _PATH_KEYS:
        if (section, key) in _OPTIONAL_PATH_KEYS and value in ("", None):
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a non-empty path string, e.g. {where} = \"/var/lib/edge-node\"")
        return Path(value).expanduser()
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number of seconds, not {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, not {value!r}")
        return value
    return value


def _callers(value: Any) -> tuple[AllowedCaller, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            'receiver.allowed_callers must be a list of tables, e.g. [ { ae_title = "CT_SCANNER_1", host = "10.1.2.3" } ]'
        )
    out = []
    for i, entry in enumerate(value):
        where = f"receiver.allowed_callers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table like {{ ae_title = \"CT_SCANNER_1\" }}")
        unknown = set(entry) - {"ae_title", "host"}
        if unknown:
            raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}; allowed: ae_title, host")
        if "ae_title" not in entry or not isinstance(entry["ae_title"], str):
            raise ConfigError(f"{where}.ae_title is required and must be a string")
        host = entry.get("host")
        if host is not None and (not isinstance(host, str) or not host):
            raise ConfigError(f"{where}.host must be a non-empty string (an IP address or host name) or left out")
        _check_ae_title(f"{where}.ae_title", entry["ae_title"])
        out.append(AllowedCaller(ae_title=entry["ae_title"].strip(), host=host))
    return tuple(out)


def _check_ae_title(where: str, title: str) -> None:
    stripped = title.strip()
    if not stripped:
        raise ConfigError(f"{where} must not be empty; use up to 16 characters such as \"EDGE_NODE\"")
    if len(stripped) > 16:
        raise ConfigError(f"{where} {title!r} is {len(stripped)} characters; an AE title has at most 16 (PS3.5 AE): shorten it")
    if "\\" in title:
        raise ConfigError(f"{where} {title!r} contains a backslash, which an AE title may not; remove it")
    if not _AE_CHARS.match(title):
        raise ConfigError(f"{where} {title!r} has control or non-ASCII characters; use letters, digits, _ and -")


def validate(settings: Settings, *, check_dirs: bool = True) -> None:
    """Check values that types alone cannot; raise `ConfigError` naming the key and the fix."""
    r = settings.receiver
    _check_ae_title("receiver.ae_title", r.ae_title)
    if not 0 <= r.port <= 65535:
        raise ConfigError(f"receiver.port {r.port} is out of range; use 1-65535 (0 picks a free port)")
    if r.max_associations < 1:
        raise ConfigError("receiver.max_associations must be at least 1")
    if not (r.max_pdu_bytes == 0 or 4096 <= r.max_pdu_bytes <= 4_194_304):
        raise ConfigError("receiver.max_pdu_bytes must be 0 (unlimited) or between 4096 and 4194304")
    if r.processes < 0 or r.processes > 64:
        raise ConfigError("receiver.processes must be 0 (one per CPU core) or between 1 and 64")
    if r.queue_size < 1:
        raise ConfigError("receiver.queue_size must be at least 1")
    if r.on_changed_content not in CHANGED_CONTENT_POLICIES:
        raise ConfigError(
            f"receiver.on_changed_content {r.on_changed_content!r} is unknown; use one of {', '.join(CHANGED_CONTENT_POLICIES)}"
        )
    if r.engine not in RECEIVER_ENGINES:
        raise ConfigError(f"receiver.engine {r.engine!r} is unknown; use one of {', '.join(RECEIVER_ENGINES)}")
    if not r.accept_any_caller and not r.allowed_callers:
        # Valid, but nobody can send: say so at load time rather than at the first rejection.
        pass
    for name in ("acse_timeout_seconds", "dimse_timeout_seconds", "network_timeout_seconds"):
        if getattr(r, name) <= 0:
            raise ConfigError(f"receiver.{name} must be positive")
    s = settings.storage
    if s.min_free_mb < 0:
        raise ConfigError("storage.min_free_mb must be 0 or more (megabytes kept free on the data disk)")
    c = settings.completion
    if c.quiet_seconds <= 0:
        raise ConfigError("completion.quiet_seconds must be positive")
    if c.max_wait_seconds < c.quiet_seconds:
        raise ConfigError("completion.max_wait_seconds must be at least completion.quiet_seconds")
    if c.check_interval_seconds <= 0:
        raise ConfigError("completion.check_interval_seconds must be positive")
    if settings.import_.settle_seconds < 0:
        raise ConfigError("import.settle_seconds must be 0 or more")
    p = settings.pipeline
    if p.device not in DEVICES and not re.fullmatch(r"cuda:\d+", p.device):
        raise ConfigError(f"pipeline.device {p.device!r} is unknown; use auto, cpu, cuda or cuda:N")
    if p.torch_threads < 0:
        raise ConfigError("pipeline.torch_threads must be 0 (torch's default) or more")
    if p.max_attempts < 1:
        raise ConfigError("pipeline.max_attempts must be at least 1")
    if settings.log.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log.level {settings.log.level!r} is unknown; use one of {', '.join(LOG_LEVELS)}")
    if check_dirs:
        _check_writable_dir("storage.data_dir", s.data_dir)
        if settings.import_.enabled:
            _check_writable_dir("import.dir", settings.import_.dir)
        if p.model_dir is not None and not p.model_dir.is_dir():
            raise ConfigError(f"pipeline.model_dir {p.model_dir} is not a directory; create it or fix the path")


def _check_writable_dir(where: str, path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{where} {path} cannot be created ({exc.strerror}); create it and give the node's user write access"
        ) from None
    if not path.is_dir():
        raise ConfigError(f"{where} {path} exists but is not a directory; point it at a directory")
    probe = path / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{where} {path} is not writable ({exc.strerror}); give the node's user write access (chown/chmod)"
        ) from None
