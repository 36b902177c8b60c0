"""One log line per client failure on Flower's runtime too.

Flower's simulation engine logs a raising ClientApp as a line, the Ray error (a banner
and the client's traceback) and then the whole traceback again, about 60 lines per
failure, before the ServerApp even sees the error reply, which fedsim then logs as one
rejection line naming the node. ``install`` puts ``OneLineClientErrors`` on the ``flwr``
logger of the process that runs the ServerApp: Flower's records of a client's exception
are dropped (the rejection line says it, as ``Type: message`` of the client's
exception), any other multi-line warning or error becomes ``fedsim.errors.one_line`` of
it and a bare traceback record is dropped, unless ``FEDSIM_DEBUG`` (``fedsim run
--debug``) asks for everything.
"""

from __future__ import annotations

import logging
import os

from fedsim.errors import FLOWER_WRAPPER, TRACEBACK, one_line

# What Flower's Ray backend logs before the ServerApp gets the error reply, which fedsim
# then logs itself with the node id (``round R: rejected the reply of node N: ...``).
RAY_BACKEND_ERROR = "An exception was raised when processing a message by RayBackend"


def debugging() -> bool:
    return os.environ.get("FEDSIM_DEBUG", "") not in ("", "0")


class OneLineClientErrors(logging.Filter):
    """Multi-line warnings and errors of Flower's logger on one line; bare tracebacks dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or debugging():
            return True
        text = record.getMessage()
        if text.startswith(RAY_BACKEND_ERROR) or (FLOWER_WRAPPER in text and record.levelno >= logging.ERROR):
            return False  # said once, with the node id, by the strategy's rejection line
        if "\n" not in text and "\r" not in text:
            return True
        if text.lstrip().startswith(TRACEBACK):
            return False
        record.msg, record.args = one_line(text.strip(), limit=1000), None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to ``logger`` (Flower's by default) once."""
    target = logger or logging.getLogger("flwr")
    if not any(isinstance(f, OneLineClientErrors) for f in target.filters):
        target.addFilter(OneLineClientErrors())
