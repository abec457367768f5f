"""Progress that tells, anywhere: a run as explicit stages, each with its own fixed count.

    stages = Stages.for_stderr()
    stages.stage("search", 280, "candidates")       # ends the stage before, starts this one
    stages.advance(16, passed="61%", best="0.31")    # units of work done (and what to show beside)
    stages.message("timestep 2/5")                   # what the stage is doing now
    stages.note("reusing stored rows")               # a line of its own
    stages.close()                                   # ends the last stage
    stages.summary()  # "time per stage: search 300 s, ..."; stages.stage_seconds = {"search": 300.0}

In a terminal (the stream is a tty) every stage draws its own tqdm bar with a total fixed at the
start of the stage, so percent and ETA never reset; notes and the `nos` loggers' lines go through
`tqdm.write` (they do not tear a bar). Anywhere else -- nohup, a batch scheduler, a file -- it
writes plain lines stamped with the time since the start:

    [00:01:23] search (timestep 2/5): 120/280 candidates (43%), ETA 1m51s, passed 61%, best 0.31

at the start and end of every stage, and in between at least every `every` seconds
(NOS_PROGRESS_EVERY, 10 by default) even while no work completes -- a background thread keeps the
lines coming during a long training -- and never more than one a second.

Dependency-free apart from tqdm, which only the terminal mode imports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO, runtime_checkable

EVERY_ENV = "NOS_PROGRESS_EVERY"  # seconds between plain progress lines
DEFAULT_EVERY = 10.0
MIN_GAP = 1.0  # never more than about one progress line a second


@runtime_checkable
class Reporter(Protocol):
    """What the long computations report to (a `Stages`, or `nos.search.Progress`)."""

    def stage(self, name: str, total: int | None, unit: str) -> None: ...

    def advance(self, n: int = 1, **postfix: Any) -> None: ...

    def message(self, msg: str) -> None: ...


class _Messages:
    """A plain callable (e.g. `log.info`) as a Reporter: it hears the messages and stage starts."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def stage(self, name: str, total: int | None, unit: str) -> None:
        self.say(f"{name}: {total if total is not None else '?'} {unit}")

    def advance(self, n: int = 1, **postfix: Any) -> None:
        pass

    def message(self, msg: str) -> None:
        self.say(msg)


def reporter(progress: Reporter | Callable[[str], None] | None) -> Reporter:
    """Any `progress` argument as a Reporter (None: silent; a callable: its messages only)."""
    if progress is None:
        return _Messages(lambda msg: None)
    if isinstance(progress, Reporter):
        return progress
    return _Messages(progress)


def every_from_env(default: float = DEFAULT_EVERY) -> float:
    """NOS_PROGRESS_EVERY in seconds (at least MIN_GAP); `default` when unset or not a number."""
    try:
        value = float(os.environ.get(EVERY_ENV, default))
    except ValueError:
        return default
    return max(MIN_GAP, value) if value == value else default  # NaN -> default


def clock_text(seconds: float) -> str:
    """Elapsed time as [hh:mm:ss] (hours grow past 99)."""
    s = max(0, int(seconds))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def duration_text(seconds: float) -> str:
    """A short duration: 45s, 2m10s, 1h02m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def eta_text(count: int, total: int | None, elapsed: float) -> str:
    """Time left at the stage's pace so far ("?" before the first unit; "" without a total)."""
    if total is None:
        return ""
    if count >= total:
        return "0s"
    if count <= 0 or elapsed <= 0:
        return "?"
    return duration_text(elapsed / count * (total - count))


def seconds_text(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class _Stage:
    def __init__(self, name: str, total: int | None, unit: str, start: float) -> None:
        self.name, self.total, self.unit, self.start = name, total, unit, start
        self.count = 0
        self.detail = ""
        self.postfix: dict[str, Any] = {}
        self.bar: Any = None  # the tqdm bar (terminal mode)


class Stages:
    """A run's stages on one stream (see the module docstring). Thread-safe: a background thread
    writes the periodic lines; `tick()` is what it calls, for tests with an injected clock."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, every: float = DEFAULT_EVERY,
                 clock: Callable[[], float] = time.monotonic, heartbeat: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.every = max(MIN_GAP, every)
        self.clock = clock
        self.heartbeat = heartbeat
        self.t0 = clock()
        self._last_line = float("-inf")
        self._current: _Stage | None = None
        self._seconds: dict[str, float] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exit = contextlib.ExitStack()
        self._redirected = False

    @classmethod
    def for_stderr(cls) -> Stages:
        """Stages on sys.stderr: bars in a terminal, timestamped lines elsewhere."""
        return cls(sys.stderr, every=every_from_env())

    # ------------------------------------------------------------------ reporting
    def stage(self, name: str, total: int | None = None, unit: str = "") -> None:
        """End the current stage and start `name`, whose count goes to `total` (None: unknown)."""
        with self._lock:
            self._end()
            now = self.clock()
            st = self._current = _Stage(name, None if total is None else max(0, int(total)), unit, now)
            if self.tty:
                self._start_terminal()
                from tqdm import tqdm

                st.bar = tqdm(total=st.total, desc=name, unit=f" {unit}" if unit else "it", file=self.stream,
                              leave=True, mininterval=0.2)
            else:
                count = f"{st.total} {unit}" if st.total is not None else f"{unit or 'units'}, count unknown"
                self._line(f"{name}: started, {count}".rstrip(), now)
        self._start_heartbeat()

    def advance(self, n: int = 1, **postfix: Any) -> None:
        """`n` more units of the current stage are done; `postfix` (e.g. best=0.31) is shown beside."""
        with self._lock:
            st = self._current
            if st is None:
                return
            st.count += n
            if postfix:
                st.postfix.update(postfix)
            if st.bar is not None:
                if postfix:
                    st.bar.set_postfix_str(self._postfix_text(st, "="), refresh=False)
                st.bar.update(n)
            else:
                self._maybe_line(self.every)

    def message(self, msg: str) -> None:
        """What the current stage is doing now (shown with its count; a line when it changes, at
        most one a second)."""
        with self._lock:
            st = self._current
            if st is None:
                self.note(msg)
                return
            if msg == st.detail:
                return
            st.detail = msg
            if st.bar is not None:
                st.bar.set_postfix_str(self._postfix_text(st, "="))
            else:
                self._maybe_line(MIN_GAP)

    def note(self, msg: str) -> None:
        """A line of its own (above the bars in a terminal)."""
        with self._lock:
            if self.tty:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self._line(msg, self.clock())

    def end(self) -> None:
        """End the current stage (its time goes into `stage_seconds`)."""
        with self._lock:
            self._end()

    def close(self) -> None:
        """End the last stage, stop the background thread, give the loggers back."""
        self.end()
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self._exit.close()

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the summary
    @property
    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage name, in order of first start (a stage run twice adds up); the
        current stage counts up to now."""
        with self._lock:
            out = dict(self._seconds)
            st = self._current
            if st is not None:
                out[st.name] = out.get(st.name, 0.0) + self.clock() - st.start
            return out

    def summary(self) -> str:
        """"time per stage: pretraining 120 s, search 300 s, ..." (or "no stages")."""
        parts = [f"{name} {seconds_text(s)}" for name, s in self.stage_seconds.items()]
        return "time per stage: " + (", ".join(parts) if parts else "no stages")

    def print_summary(self) -> None:
        """End the current stage and write the summary line."""
        self.end()
        self.note(self.summary())

    # ------------------------------------------------------------------ the periodic lines
    def tick(self) -> None:
        """Called about every second: a plain line if `every` seconds passed since the last one;
        in a terminal the bar's clock and ETA are redrawn."""
        with self._lock:
            st = self._current
            if st is None:
                return
            if st.bar is not None:
                st.bar.refresh()
            else:
                self._maybe_line(self.every)

    def progress_text(self) -> str:
        """The current stage as one line (without the time stamp)."""
        with self._lock:
            st = self._current
            if st is None:
                return ""
            head = f"{st.name} ({st.detail})" if st.detail else st.name
            unit = f" {st.unit}" if st.unit else ""
            if st.total is None:
                text = f"{head}: {st.count}{unit}"
            else:
                pct = 100 * st.count / st.total if st.total else 100.0
                eta = eta_text(st.count, st.total, self.clock() - st.start)
                text = f"{head}: {st.count}/{st.total}{unit} ({pct:.0f}%), ETA {eta}"
            extra = self._postfix_text(st, " ", detail=False)
            return f"{text}, {extra}" if extra else text

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _postfix_text(st: _Stage, sep: str, detail: bool = True) -> str:
        parts = [st.detail] if detail and st.detail else []
        parts += [f"{k}{sep}{v}" for k, v in st.postfix.items()]
        return ", ".join(parts)

    def _line(self, text: str, now: float) -> None:
        self.stream.write(f"[{clock_text(now - self.t0)}] {text}\n")
        self.stream.flush()
        self._last_line = now

    def _maybe_line(self, gap: float) -> None:
        now = self.clock()
        if now - self._last_line >= gap:
            self._line(self.progress_text(), now)

    def _end(self) -> None:
        st = self._current
        if st is None:
            return
        now = self.clock()
        took = now - st.start
        self._seconds[st.name] = self._seconds.get(st.name, 0.0) + took
        if st.bar is not None:
            st.bar.close()
        else:
            of = f"/{st.total}" if st.total is not None else ""
            unit = f" {st.unit}" if st.unit else ""
            word = "done" if st.total is None or st.count >= st.total else "stopped"
            extra = self._postfix_text(st, " ", detail=False)
            self._line(f"{st.name}: {word}, {st.count}{of}{unit} in {duration_text(took)}"
                       + (f", {extra}" if extra else ""), now)
        self._current = None

    def _start_terminal(self) -> None:
        """Once: the `nos` loggers write through tqdm while bars are drawn (restored on close)."""
        if self._redirected:
            return
        self._redirected = True
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._exit.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger("nos")]))

    def _start_heartbeat(self) -> None:
        if not self.heartbeat or self._thread is not None or self._stop.is_set():
            return

        def beat() -> None:
            while not self._stop.wait(min(1.0, self.every)):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 -- a closed stream must not kill the run
                    return

        self._thread = threading.Thread(target=beat, name="nos-progress", daemon=True)
        self._thread.start()
