"""Alembic migrations of the vlcache schema (shipped inside the package)."""
