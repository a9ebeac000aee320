"""Version, kept in one place for the package, the tracer scope and the meter scope."""

VERSION = "0.1.0"
