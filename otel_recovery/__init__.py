"""otel-recovery (public surface being assembled)."""

from otel_recovery.__about__ import VERSION as __version__  # noqa: N811

__all__ = ["__version__"]
