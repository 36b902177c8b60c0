"""The user-facing errors of fedsim: the CLI prints their message on one line, no traceback.

- ``ConfigError``: a run config, experiment or sweep file, or command-line value is
  invalid; the message names the key, the value and what to do (exit code 2).
- ``RunFailed``: a run went to its end but learned nothing usable, e.g. no round had
  ``min-replies`` valid replies (exit code 1); its results folder says so in summary.json.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A run-config value is missing or invalid; the message says which and what to do."""


class RunFailed(RuntimeError):
    """A run ended without a usable result; the message says why and where to look."""


# A reason a client sent is logged on one line of at most this many characters.
MAX_REASON_CHARS = 300


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` made safe for one log line: a traceback becomes its last line (the
    exception), every character that is not printable (newlines, carriage returns, escape
    codes, Unicode line separators) is written as its Python escape, and the result is cut
    to ``limit`` characters, saying how many were left out."""
    if "Traceback (most recent call last)" in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1].strip() if lines else text
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(out) > limit:
        out = f"{out[:limit]}... ({len(out) - limit} more characters)"
    return out
