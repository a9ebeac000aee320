"""The store suite: the same behaviour against memory, SQLite, Redis and PostgreSQL."""
