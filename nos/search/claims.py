"""Claims between processes that share one run (a shared PostgreSQL database).

Work that exactly one process must do -- a chunk of candidates, a stage's Adam reference, the
funnel -- is claimed by a row in the run's `claims` table. The holder keeps its claims fresh from a
background heartbeat; a claim whose heartbeat stands still for `stale_s` belongs to a dead process
and is taken over. Everything here talks to storage only through `Storage.claim`, `claim_state`,
`take_over` and `heartbeat`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from db.storage import Storage


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Cooperation:
    """How this process shares a run with others (claims in the run's database).

    `stale_s`: a claim whose heartbeat has not moved for this long belongs to a dead process and
    is taken over. The owner beats every `heartbeat_s`; others look every `poll_s`.
    """

    owner: str = field(default_factory=_default_owner)
    stale_s: float = 60.0
    poll_s: float = 0.5

    @property
    def heartbeat_s(self) -> float:
        return max(0.2, min(5.0, self.stale_s / 4))


class Claims:
    """This process's claims on one run, with the heartbeat that keeps them alive."""

    def __init__(self, storage: Storage, run_id: int, coop: Cooperation,
                 message: Callable[[str], None] = lambda msg: None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.coop = coop
        self.message = message
        self._stop_beat = threading.Event()
        self._beat: threading.Thread | None = None

    def claim(self, key: str) -> bool:
        """Claim `key` now if nobody holds it (no waiting)."""
        return self.storage.claim(self.run_id, key, self.coop.owner)

    def claim_or_wait(self, key: str, ready: Callable[[], bool]) -> bool:
        """True: this process holds the claim on `key` and must do the work. False: `ready()`
        became true because another process did it. A claim whose heartbeat stands still for
        `stale_s` (its owner died) is taken over."""
        self.start_heartbeat()
        seen: tuple[str, int] | None = None
        since = time.monotonic()
        while True:
            if self.claim(key):
                return True
            if ready():
                return False
            state = self.storage.claim_state(self.run_id, key)
            if state != seen:
                seen, since = state, time.monotonic()
            elif state is not None and time.monotonic() - since > self.coop.stale_s:
                if self.storage.take_over(self.run_id, key, self.coop.owner, state):
                    self.message(f"took over {key} from {state[0]} (no heartbeat for {self.coop.stale_s:g} s)")
                    return True
            time.sleep(self.coop.poll_s)

    def start_heartbeat(self) -> None:
        """Keep this process's claims fresh from a background thread."""
        if self._beat is not None:
            return
        coop, stop = self.coop, self._stop_beat

        def beat() -> None:
            while not stop.wait(coop.heartbeat_s):
                try:
                    self.storage.heartbeat(self.run_id, coop.owner)
                except Exception:  # noqa: BLE001 -- a missed beat only risks a take-over; retry
                    pass

        self._beat = threading.Thread(target=beat, name="nos-heartbeat", daemon=True)
        self._beat.start()

    def close(self) -> None:
        """Stop the heartbeat (a process that stops working must let others take over)."""
        self._stop_beat.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
