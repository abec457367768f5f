"""Cross-process claims and heartbeats (SQL): how cooperating processes split a run's work.

Before judging a chunk a process inserts a claim ``(run_id, key)``; the unique constraint
uq_claims_run_key makes exactly one of several concurrent processes the owner. While it works
the owner's heartbeat thread bumps ``heartbeat`` of all its claims; a claim whose heartbeat
stops moving belongs to a dead process and may be taken over (`SQLClaims.take_over`).
"""

from __future__ import annotations

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import Claim, check_stored, utcnow
from db.sql_engine import SQLBase


class SQLClaims(SQLBase):
    """`db.storage.Storage`'s claim methods on SQL."""

    def claim(self, run_id: int, key: str, owner: str) -> bool:
        """Try to become the process that judges ``key`` of the run; True if ``owner`` holds it.

        Exactly one of several concurrent callers wins (unique ``(run_id, key)``); a
        process asking again for its own claim gets True.
        """

        def write(session: Session) -> bool:
            try:
                with session.begin_nested():
                    session.execute(insert(Claim), [{"run_id": run_id, "key": key, "owner": owner,
                                                     "heartbeat": 0, "claimed_at": utcnow()}])
                return True
            except IntegrityError:
                holder = session.scalar(
                    select(Claim.owner).where(Claim.run_id == run_id, Claim.key == key)
                )
                return holder == owner

        return self._transaction("claim", write, write=True)

    def claim_state(self, run_id: int, key: str) -> tuple[str, int] | None:
        """``(owner, heartbeat)`` of a claim, or None when nobody claimed ``key``."""
        stmt = select(Claim.owner, Claim.heartbeat).where(Claim.run_id == run_id, Claim.key == key)

        def read(session: Session) -> tuple[str, int] | None:
            row = session.execute(stmt).first()
            if row is None:
                return None
            c = Claim.__table__.c
            return check_stored("claims", c.owner, row[0]), check_stored("claims", c.heartbeat, row[1])

        return self._transaction("claim_state", read)

    def take_over(self, run_id: int, key: str, owner: str, seen: tuple[str, int]) -> bool:
        """Take a stale claim: succeeds only if it is still exactly as ``seen`` (owner, heartbeat).

        The stale owner's other claims in the run come along: `heartbeat` bumps all of an
        owner's claims at once, so they are just as stale, and taking them one by one would
        cost a waiting process ``--claim-timeout`` per chunk the dead process held (a resumed
        run after a crash waited minutes)."""
        stmt = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.key == key, Claim.owner == seen[0],
                   Claim.heartbeat == seen[1])
            .values(owner=owner, heartbeat=0, claimed_at=utcnow())
        )
        rest = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.owner == seen[0])
            .values(owner=owner, heartbeat=0, claimed_at=utcnow())
        )

        def write(session: Session) -> bool:
            if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
                return False
            session.execute(rest)
            return True

        return self._transaction("take_over", write, write=True)

    def heartbeat(self, run_id: int, owner: str) -> None:
        """Show that ``owner`` is alive: bump the heartbeat of all its claims in the run."""
        stmt = (
            update(Claim)
            .where(Claim.run_id == run_id, Claim.owner == owner)
            .values(heartbeat=Claim.heartbeat + 1)
        )
        self._transaction("heartbeat", lambda s: s.execute(stmt) and None, write=True)
