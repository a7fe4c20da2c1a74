"""Configuration: typed settings (`config.settings`) and their loading and validation (`config.load`)."""

from config.load import ConfigError, default_config_path, load_settings
from config.settings import Settings

__all__ = ["ConfigError", "Settings", "default_config_path", "load_settings"]
