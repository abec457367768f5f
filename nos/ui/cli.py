"""Shared plumbing of the `python -m nos.X` commands: arguments, errors, output formats."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from tabulate import tabulate

if TYPE_CHECKING:
    import torch

DEFAULT_DB = "runs/nos.sqlite"
MAX_ID = 2**63 - 1  # database ids, seeds and counts must fit a signed 64-bit integer
MAX_LINE = 300  # an error line is cut to this many characters
MAX_NAME = 128  # a new run's name
# Shared limits of the commands' numbers (each checked where it is parsed):
MIN_HORIZON, MAX_HORIZON = 0.5, 100.0  # t_max: 10 points (the MLP reads 8) .. 2,000 points
MIN_BUDGET, MAX_BUDGET = 3, 1_000_000  # forward-pass equivalents: at least one gradient step
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
# Unicode categories never printed raw: controls, format (bidi overrides, zero-width),
# surrogates (undecodable argv bytes), private use, unassigned, line/paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# Set by nos/__main__.main while it runs a verb ("nos", or "python -m nos"), so that messages name
# the command the user typed: each module names itself `python -m nos.VERB`, which is then shown
# as `nos VERB`. None: the module was started directly and keeps its own name.
_dispatcher: str | None = None
_MODULE_COMMAND = re.compile(r"python -m nos\.([a-z]+)\b")


def set_dispatcher(name: str | None) -> str | None:
    """Name the dispatcher that started this command (None: none); returns the previous name."""
    global _dispatcher
    before, _dispatcher = _dispatcher, name
    return before


def invocation(text: str) -> str:
    """``text`` with each ``python -m nos.VERB`` written as the command the user typed: ``nos VERB``
    when the process was started through the `nos` dispatcher, unchanged otherwise."""
    if _dispatcher is None or "python -m nos." not in text:
        return text
    return _MODULE_COMMAND.sub(lambda m: f"{_dispatcher} {m.group(1)}", text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exits 2 (never a traceback), and
    names itself as the user typed it (`invocation`: ``nos query`` or ``python -m nos.query``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prog = invocation(self.prog)
        self.description = None if self.description is None else invocation(self.description)
        self.epilog = None if self.epilog is None else invocation(self.epilog)

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see --help)")


def escape(text: str) -> str:
    """``text`` with every control, format, surrogate or separator character escaped the way
    ``repr`` does (``\\n``, ``\\x1b``, ``\\u202e``), so it prints as exactly one line and
    never drives the terminal."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == " " or unicodedata.category(ch) not in _UNPRINTABLE and ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def one_line(message: str, limit: int = MAX_LINE) -> str:
    """``message`` escaped (see `escape`) and cut to ``limit`` characters."""
    text = escape(str(message))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(text: object, limit: int = 40) -> str:
    """A user's value quoted for a message: repr-escaped and cut to about ``limit`` characters."""
    r = repr(text[: limit + 1] if isinstance(text, str) else text)
    return r if len(r) <= limit + 2 else r[:limit] + "..." + r[-1]


def fail(message: str, code: int = 2) -> NoReturn:
    """Report ``message`` as one escaped line of at most ~300 characters on stderr and exit."""
    print(f"error: {one_line(invocation(str(message)))}", file=sys.stderr)
    sys.exit(code)


def run_command(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a command's main, turning user errors into one line + exit 2 and Ctrl-C into 130."""
    from db.store import StoreError  # local: keep `nos.ui.cli` importable without touching the db

    setup_logging()
    try:
        return main(argv)
    except BrokenPipeError:  # `nos query ... | head`: the reader has gone, nothing left to say
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    except _user_errors(StoreError) as e:  # evaluated only once something was raised
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        fail(str(msg))
    except OSError as e:  # a path the user named: unreadable, a directory, a full disk ...
        where = f"{e.filename}: " if e.filename is not None else ""
        fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured output)
        pass


def _user_errors(store_error: type[Exception]) -> tuple[type[Exception], ...]:
    """The exceptions `run_command` reports as one line + exit 2: UsageError, StoreError,
    FileNotFoundError, KeyError and, once `search_space.genome` is loaded, GenomeError.

    GenomeError is not imported for this: its module imports torch, and an exception of a class
    never imported cannot have been raised, so commands that never touch a genome (``--help``,
    ``nos query runs``, usage errors) start without torch."""
    errors: tuple[type[Exception], ...] = (UsageError, store_error, FileNotFoundError, KeyError)
    genome = sys.modules.get("search_space.genome")
    return errors if genome is None else (*errors, genome.GenomeError)


class _Formatter(logging.Formatter):
    """Plain lines, each `python -m nos.VERB` in them named as the user typed it (`invocation`)."""

    def format(self, record: logging.LogRecord) -> str:
        return invocation(super().format(record))


def setup_logging(level: int = logging.INFO) -> None:
    """Diagnostics (progress notes, warnings) go to stderr through `logging`, one plain line each,
    so that stdout carries only results (one JSON document with --format json)."""
    root = logging.getLogger("nos")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False


def add_format(p: argparse.ArgumentParser, choices: Sequence[str] = ("table", "json")) -> None:
    p.add_argument("--format", choices=list(choices), default="table", help="output format (default: table)")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks CUDA when present")


def resolve_device(name: str) -> torch.device:
    """The device a training command runs on (and a check of the kernel choices in the
    environment, `NOS_ROLLOUT` and `NOS_UPDATE`, before anything is written)."""
    import torch  # here, not at the top: `nos.query` and friends start faster without it

    from ..engine.fused import default_update
    from ..tasks.sine_kernel import default_kernel

    for choose in (default_kernel, default_update):
        try:
            choose()
        except ValueError as e:
            raise UsageError(str(e)) from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return torch.device(name)


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's intra-op threads for the training in this process (see `apply_threads`)."""
    p.add_argument("--threads", type=bounded_int(1, 1024, "a number of threads"), default=None,
                   help="torch intra-op threads (default: half the CPU cores, at least 1; "
                        "OMP_NUM_THREADS, when set, is kept)")


def apply_threads(args: argparse.Namespace) -> int:
    """Set torch's intra-op thread count from ``args.threads`` (or the default); returns it.

    The default is half the CPU cores this process may run on, at least 1 -- not torch's own
    default (every core). Measured by ``python -m nos.bench`` on this project's 2-core machine
    (interpreter running Adam on 256 candidates at t_max = 5, candidate-steps/s): alone, 2 threads
    give 1,991 and 1 thread 1,341; beside one other busy torch process, 2 threads collapse to 27
    (74x slower: an OpenMP thread waiting for its descheduled sibling spins) while 1 thread keeps
    1,264 (1.06x). So 1 thread here: a third slower on an idle machine, never a collapse on a
    shared one (README "Benchmarks"). ``OMP_NUM_THREADS``, when set and no ``--threads`` is
    given, is respected (torch has already read it). Dask worker processes are not affected:
    Dask's nanny starts each with OMP_NUM_THREADS=1.
    """
    import os

    import torch

    n = getattr(args, "threads", None)
    if n is None:
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        n = max(1, cores // 2)
    torch.set_num_threads(n)
    return n


_INT = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits only: int() also takes "٣", "1_0", " 1 "
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def bound(n: int) -> str:
    """An integer bound as a message shows it: the 64-bit limit as ``2^63-1``, not 19 digits."""
    return "2^63-1" if n == MAX_ID else "-2^63" if n == -MAX_ID - 1 else str(n)


def parse_int(text: str, lo: int, hi: int, what: str = "an integer") -> int:
    """``text`` as an int in [lo, hi]; ValueError (one line, the text quoted) otherwise."""
    text = text.strip() if isinstance(text, str) else text
    v = int(text) if isinstance(text, str) and _INT.fullmatch(text) else None
    interval = f"[{bound(lo)}, {bound(hi)}]"
    if v is None:  # argparse's own wording for a non-number
        raise ValueError(f"invalid int value: {shown(text)} (expected {what} in {interval})")
    if not lo <= v <= hi:
        raise ValueError(f"expected {what} in {interval}, got {shown(text)}")
    return v


def parse_float(text: str, lo: float, hi: float, what: str = "a number", *, lo_open: bool = False) -> float:
    """``text`` as a finite float in [lo, hi] (or (lo, hi] with ``lo_open``); ValueError otherwise."""
    text = text.strip() if isinstance(text, str) else text
    v = float(text) if isinstance(text, str) and len(text) <= 64 and _FLOAT.fullmatch(text) else None
    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if v is None or not math.isfinite(v):
        raise ValueError(f"invalid float value: {shown(text)} (expected {what}, finite, in {interval})")
    if not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise ValueError(f"expected {what} in {interval}, got {shown(text)}")
    return v


def bounded_int(lo: int, hi: int, what: str = "an integer") -> Callable[[str], int]:
    """An argparse ``type``: an int in [lo, hi] written in ASCII digits."""

    def conv(text: str) -> int:
        try:
            return parse_int(text, lo, hi, what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = what  # argparse names the type in some messages
    return conv


def finite_float(lo: float, hi: float, what: str = "a number", *, lo_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite float in [lo, hi] (``lo_open``: lo excluded)."""

    def conv(text: str) -> float:
        try:
            return parse_float(text, lo, hi, what, lo_open=lo_open)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = what
    return conv


positive_int = bounded_int(1, MAX_ID, "a positive integer")
nonneg_int = bounded_int(0, MAX_ID, "an integer >= 0")
record_id = bounded_int(1, MAX_ID, "an id (a positive integer)")
seed_int = bounded_int(0, MAX_ID, "a seed (an integer >= 0)")


def number_list(text: str, conv: Callable[[str], Any] = float, *, lo: float | None = None,
                hi: float | None = None, max_items: int = 100, what: str = "numbers") -> tuple:
    """`"1,2,5"` -> (1.0, 2.0, 5.0): finite numbers (ints with ``conv=int``), optionally in
    [lo, hi], at most ``max_items``; ValueError with a one-line message otherwise."""
    if not isinstance(text, str) or len(text) > 100 * max_items:
        raise ValueError(f"expected at most {max_items} comma-separated {what}")
    parts = [x for x in text.split(",") if x.strip()]
    if len(parts) > max_items:
        raise ValueError(f"expected at most {max_items} comma-separated {what}, got {len(parts)}")
    values = []
    for x in parts:
        x = x.strip()
        ok = len(x) <= 64 and (_INT if conv is int else _FLOAT).fullmatch(x) is not None
        v = (int(x) if conv is int else float(x)) if ok else None
        if v is None or not math.isfinite(v):
            kind = "an integer" if conv is int else "a finite number"
            raise ValueError(f"expected comma-separated {what}: {shown(x)} is not {kind}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"expected comma-separated {what}: {shown(x)} is outside [{_num(lo)}, {_num(hi)}]")
        values.append(v)
    return tuple(values)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)


def list_of(conv: Callable[[str], Any], *, lo: float, hi: float, max_items: int,
            what: str) -> Callable[[str], tuple]:
    """An argparse ``type``: a non-empty comma-separated list (see `number_list`)."""

    def parse(text: str) -> tuple:
        try:
            values = number_list(text, conv, lo=lo, hi=hi, max_items=max_items, what=what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {what}, got {shown(text)}")
        return values

    parse.__name__ = what
    return parse


def text_arg(what: str, max_len: int = 1000) -> Callable[[str], str]:
    """An argparse ``type``: printable text (no control characters, valid UTF-8), bounded."""

    def conv(text: str) -> str:
        if not text or len(text) > max_len:
            raise argparse.ArgumentTypeError(f"{what}: expected 1 to {max_len} characters")
        if any(unicodedata.category(c) == "Cs" for c in text):
            raise argparse.ArgumentTypeError(f"{what} is not valid UTF-8: {shown(text)}")
        if escape(text) != text:
            raise argparse.ArgumentTypeError(f"{what} contains control characters: {shown(text)}")
        return text

    conv.__name__ = what
    return conv


def path_arg(what: str = "path") -> Callable[[str], str]:
    """An argparse ``type``: a file or directory name: no control character (NUL, newline,
    escape ...: surely a mistake, and a NUL cannot be passed to the OS), bounded length.
    Undecodable bytes (surrogate escapes) are fine: POSIX names are bytes."""

    def conv(text: str) -> str:
        if not text or len(text) > 4096 or any(unicodedata.category(c) == "Cc" for c in text):
            raise argparse.ArgumentTypeError(f"{what}: expected a path without control characters, got {shown(text)}")
        return text

    conv.__name__ = what
    return conv


db_arg = path_arg("database path or URL")
run_ref = text_arg("run name or id", 255)


def run_name(text: str) -> str:
    """An argparse ``type`` for a new run's name: ASCII letters, digits and ``. _ + -``, starting
    with a letter or digit, not all digits (that would read as an id), at most 128 characters
    (it names files: ``runs/NAME/``)."""
    if not (1 <= len(text) <= MAX_NAME and RUN_NAME.fullmatch(text)) or text.isdigit():
        raise argparse.ArgumentTypeError(
            f"a run name is 1 to {MAX_NAME} of A-Z a-z 0-9 . _ + - (starting with a letter "
            f"or digit, not all digits), got {shown(text)}"
        )
    return text


def clean_json(x: Any) -> Any:
    """Make data JSON-safe: NaN/inf become null, tuples lists, datetimes ISO strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean_json(v) for v in x]
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return x


def print_json(data: Any) -> None:
    print(json.dumps(clean_json(data), indent=2, sort_keys=False))


def fmt_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.4g}"
        return f"{v:.3e}"
    if hasattr(v, "isoformat"):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return escape(str(v))  # stored text reaches a terminal: no raw control characters


def render_table(cells: Sequence[Sequence[str]], headers: Sequence[str], fmt: str = "plain") -> str:
    """The one table renderer of nos (tabulate): "plain" aligned columns, GitHub "markdown", or a
    booktabs "latex" tabular (`latex_table`)."""
    if fmt == "latex":
        return latex_table(cells, headers)
    return tabulate(cells, headers=list(headers), tablefmt="github" if fmt == "markdown" else "simple",
                    disable_numparse=True)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    """``text`` as literal LaTeX text: special characters escaped, control characters shown as
    `escape` shows them, and a leading ``[`` braced (after ``\\\\`` it would read as a length)."""
    out = "".join(_LATEX_SPECIAL.get(c, c) for c in escape(str(text)))
    return "{[}" + out[1:] if out.startswith("[") else out


def latex_table(cells: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    """A booktabs tabular (needs ``\\usepackage{booktabs}``): one header row, every cell escaped.
    Written here rather than by tabulate, whose empty table has no column spec."""
    lines = [r"\begin{tabular}{" + "l" * max(1, len(headers)) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in cells]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None,
                 fmt: str = "plain") -> str:
    """Rows of values as a table (`render_table`'s ``fmt``), each value shown by `fmt_value`."""
    return render_table([[fmt_value(r.get(c)) for c in columns] for r in rows], list(headers or columns), fmt)


def format_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else clean_json(r.get(c))) for c in columns})
    return buf.getvalue().rstrip("\n")
