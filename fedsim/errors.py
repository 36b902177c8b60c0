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
