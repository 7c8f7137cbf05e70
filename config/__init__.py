"""Settings for the gateway, read from ``GATEWAY_*`` environment variables and ``.env``."""

from config.backends import BackendSettings
from config.settings import Settings

__all__ = ["BackendSettings", "Settings"]
