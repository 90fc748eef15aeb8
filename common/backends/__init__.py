"""Backend interfaces (``base``) and their implementations: local, SQLite, Redis, Postgres."""
