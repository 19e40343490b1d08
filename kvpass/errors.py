"""The exceptions kvpass raises, by kind. Each message quotes the value received and what would be valid.

kvpass's backend runs inside Dynamo, which wraps a backend's exceptions in ``BackendCompilerFailed`` (with a "report
a bug to PyTorch" footer) unless they are ``ShortenTraceback``s: kvpass's errors are, so a user's ``except
kvpass.OptionError`` (or ``except ValueError``) catches them at the first forward exactly as raised.
"""

from __future__ import annotations

from torch._dynamo.exc import ShortenTraceback


class KVPassError(ShortenTraceback):
    """Base of kvpass's errors (a ``RuntimeError``, as every Dynamo exception)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, first_useful_frame=None)

    def __str__(self) -> str:
        # Dynamo appends the user frame that triggered the compile (kept: it says which forward) and a note about
        # reporting bugs to PyTorch with verbose logs (dropped: this is the user's input, not a PyTorch bug)
        text = super().__str__()
        note = text.find("\nSet TORCHDYNAMO_VERBOSE=1")
        return text if note < 0 else text[:note].rstrip("\n")


class OptionError(KVPassError, ValueError):
    """An option of ``backend="kvpass"`` (or of a kvpass API) is unknown, out of range or inconsistent."""


class UnsupportedGraph(KVPassError, ValueError):
    """kvpass cannot rewrite this graph (no attention site it recognizes, or one it must refuse); the message says
    what it found instead."""
