"""One check per kind of user input, shared by the Python API, the backend's option parser and every command line.

Each kind has one core check on Python values (``check_int``, ``check_fraction``, ``check_choice``), which raises
``ValueError`` or the error class its caller names (:mod:`kvpass.config` raises ``OptionError``), and an argparse
``type`` built on it (:class:`ArgType`; ``csv(kind)`` for a comma-separated list of that kind), which raises
``argparse.ArgumentTypeError`` so that argparse prints one line, ``argument --x: ...``, quoting the value received
and what is valid. Messages read ``<name> must be <requirement>, got <value>`` when the value is named, else
``expected <requirement>, got <value>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["ArgType", "check_choice", "check_fraction", "check_int", "check_writable", "choice", "csv", "fraction",
           "integer", "non_negative_int", "positive_int", "word"]


def _int_kind(low: int) -> str:
    return {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")


def _fail(error: type[Exception], name: str | None, requirement: str, value: Any) -> Exception:
    message = f"{name} must be {requirement}" if name else f"expected {requirement}"
    return error(f"{message}, got {value!r}")


def check_int(value: Any, name: str | None = None, *, low: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` of at least ``low`` (1: a positive integer, 0: a non-negative one).

    Accepts an integer or an integral float (``512.0``), never a bool or a string; otherwise raises ``error``.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value != int(value) or value < low:
        raise _fail(error, name, _int_kind(low), value)
    return int(value)


def check_fraction(value: Any, name: str | None = None, *, error: type[Exception] = ValueError) -> float:
    """``value`` as a ``float`` in [0, 1] (a needle depth, a share of something)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        raise _fail(error, name, "in [0, 1]" if name else "a number in [0, 1]", value)
    return float(value)


def check_choice(value: Any, valid: Iterable[str], what: str, plural: str | None = None,
                 error: type[Exception] = ValueError) -> str:
    """``value`` if it is one of ``valid``; otherwise ``unknown <what> 'x'; valid <plural>: a, b, c``."""
    names = list(valid)
    if value not in names:
        raise error(f"unknown {what} {value!r}; valid {plural or what + 's'}: {', '.join(names)}")
    return value


def check_writable(path: str | Path, what: str, *, folder: bool = False, hint: str = "") -> Path:
    """``path`` (a file, or a folder if ``folder``), after making its folder and writing a probe file there, so
    that a run fails before its work rather than when it saves; ``ValueError`` naming ``what`` otherwise."""
    path = Path(path).expanduser()
    where = path if folder else path.parent
    existing = next((p for p in (where, *where.parents) if p.exists()), None)
    problem = None
    if not folder and path.is_dir():
        problem = "it is a folder, not a file"
    elif existing is not None and not existing.is_dir():
        problem = "it is a file, not a folder" if existing == path else f"{str(existing)!r} is a file, not a folder"
    else:
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".{path.name}.kvpass-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            problem = err.strerror or str(err)
    if problem:
        raise ValueError(f"cannot write {what} {str(path)!r}: {problem}{'; ' + hint if hint else ''}")
    return path


@dataclasses.dataclass(frozen=True)
class ArgType(Generic[T]):
    """An argparse ``type``: ``convert`` turns the text into a value (``ValueError`` if it is not one of
    ``expected``), ``check`` validates it (``ValueError`` with the message to show)."""

    convert: Callable[[str], T]
    check: Callable[[T], T]
    expected: str

    def __call__(self, text: str) -> T:
        try:
            value = self.convert(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def integer(low: int = 1, name: str | None = None) -> ArgType[int]:
    """argparse type of an integer of at least ``low``; ``name`` labels the message (``budget must be ...``)."""
    return ArgType(int, lambda v: check_int(v, name, low=low), _int_kind(low))


def fraction(name: str | None = None) -> ArgType[float]:
    """argparse type of a number in [0, 1]."""
    return ArgType(float, lambda v: check_fraction(v, name), "a number in [0, 1]")


def choice(valid: Iterable[str] | Callable[[], Iterable[str]], what: str, plural: str | None = None) -> ArgType[str]:
    """argparse type of one name of ``valid`` (a collection, or a function returning one, read at parse time)."""
    names = valid if callable(valid) else (lambda: valid)
    return ArgType(str, lambda v: check_choice(v, names(), what, plural), f"a {what} name")


positive_int: ArgType[int] = integer(1)
non_negative_int: ArgType[int] = integer(0)
word: ArgType[str] = ArgType(str, lambda v: v, "a name")  # any name: its caller checks it against what it knows


def csv(kind: ArgType[T]) -> Callable[[str], list[T]]:
    """argparse type of a comma-separated list of ``kind`` (at least one; repeats dropped, order kept)."""
    noun = {int: "int ", float: "float ", str: "str "}.get(kind.convert, "")

    def parse(text: str) -> list[T]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [kind.convert(t) for t in items]
        except ValueError:
            values = []
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {noun}values, got {text!r} (each {kind.expected})")
        try:
            return list(dict.fromkeys(kind.check(v) for v in values))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}" + (f" (in {text!r})" if len(items) > 1 else "")) from None

    parse.__name__ = "comma-separated list"
    return parse
