"""``python -m otel_recovery``: the same command as ``otel-recovery``."""

from __future__ import annotations

import sys

from otel_recovery.cli import main

if __name__ == "__main__":
    sys.exit(main())
