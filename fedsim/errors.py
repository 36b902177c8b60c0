"""The user-facing errors of fedsim: the CLI prints their message on one line, no traceback.

- ``ConfigError``: a run config, experiment or sweep file, or command-line value is
  invalid; the message names the key, the value and what to do (exit code 2).
- ``RunFailed``: a run went to its end but learned nothing usable, e.g. no round had
  ``min-replies`` valid replies (exit code 1); its results folder says so in summary.json.
"""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A run-config value is missing or invalid; the message says which and what to do."""


class RunFailed(RuntimeError):
    """A run ended without a usable result; the message says why and where to look."""


# A reason a client sent is logged on one line of at most this many characters.
MAX_REASON_CHARS = 300
# Flower's wrapper of a raising ClientApp (flwr.clientapp.ClientAppException): str() of the
# client's exception follows it.
FLOWER_WRAPPER = "ClientAppException occurred. Message: "
TRACEBACK = "Traceback (most recent call last)"


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` made safe for one log line: Flower's wrapped client exception (a Ray
    traceback around ``ClientAppException``) becomes ``Type: message`` of the client's
    exception, any other traceback its last line; every character that is not printable
    (newlines, carriage returns, escape codes, Unicode line separators) is written as its
    Python escape, and the result is cut to ``limit`` characters, saying how many were
    left out."""
    if FLOWER_WRAPPER in text:
        text = _client_exception(text)
    elif TRACEBACK in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1].strip() if lines else text
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(out) > limit:
        out = f"{out[:limit]}... ({len(out) - limit} more characters)"
    return out


def _client_exception(text: str) -> str:
    """``Type: message`` of the exception Flower wrapped (the type from the traceback's line
    that starts the message, where there is one)."""
    message = text.rsplit(FLOWER_WRAPPER, 1)[1].rstrip()
    message = message.removesuffix("'>")
    first = message.splitlines()[0] if message else ""
    typed = re.search(rf"^([A-Za-z_][\w.]*): {re.escape(first)}$", text, re.MULTILINE) if first else None
    return f"{typed.group(1)}: {message}" if typed else f"ClientApp raised: {message}"
