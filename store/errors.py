"""Errors raised by the store.

    StoreError                  anything the store could not do
    +-- StoreUnavailable        the database cannot be reached or written (driver errors land here)
    +-- MigrationError          the schema could not be brought to the current revision

Driver and SQLAlchemy exceptions are translated at the package edge, so callers (the proxy's
cache service) catch one tree and fail open.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises."""


class StoreUnavailable(StoreError):
    """The database could not be reached, read or written."""


class MigrationError(StoreError):
    """Alembic could not bring the schema to head."""
