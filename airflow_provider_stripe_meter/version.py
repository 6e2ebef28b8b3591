"""The package's version, in one place (read by ``pyproject.toml`` and the provider info)."""

__version__ = "0.1.0"
