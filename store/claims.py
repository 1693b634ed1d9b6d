"""Claim rows: one process answers an identical miss, the others on the database wait for it.

``claim`` inserts ``(exact_key, owner, expires_at)`` or takes over a claim whose lease ran out;
the holder renews its lease while the upstream answers, and the row is deleted in the same
transaction that stores the answer (``_insert_entries``) or, when there is nothing to store, by
the holder at once. A follower polls for the entry and gives up (asking the upstream itself) as
soon as the claim is gone without an entry, or has expired.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from .models import Claim


async def take(conn: AsyncConnection, exact_key: str, owner: str, now: float, lease: float) -> bool:
    """Claim ``exact_key`` for ``owner``; False when a live claim of another holder exists."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    inserted = await conn.execute(
        insert(Claim)
        .values(exact_key=exact_key, owner=owner, expires_at=now + lease)
        .on_conflict_do_nothing(index_elements=["exact_key"])
    )
    if inserted.rowcount == 1:
        return True
    taken_over = await conn.execute(
        update(Claim)
        .where(Claim.exact_key == exact_key, Claim.expires_at < now)
        .values(owner=owner, expires_at=now + lease)
    )
    return taken_over.rowcount == 1


async def renew(conn: AsyncConnection, keys: list[str], owner: str, until: float) -> None:
    """Extend this holder's claims on ``keys``."""
    await conn.execute(
        update(Claim)
        .where(Claim.exact_key.in_(keys), Claim.owner == owner)
        .values(expires_at=until)
    )


async def drop(conn: AsyncConnection, keys: list[str], owner: str) -> None:
    """Delete this holder's claims on ``keys``."""
    await conn.execute(delete(Claim).where(Claim.exact_key.in_(keys), Claim.owner == owner))


async def state(conn: AsyncConnection, exact_key: str) -> float | None:
    """When the claim on ``exact_key`` expires, or None when there is none."""
    row = (await conn.execute(select(Claim.expires_at).where(Claim.exact_key == exact_key))).first()
    return None if row is None else float(row.expires_at)
