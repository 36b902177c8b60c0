"""Callbacks of a run's lifecycle (fedsim.callbacks.base): fedsim's own, experiment
tracking (TensorBoard, MLflow) and a user's own.

A user passes callback objects from Python (``fedsim.engine.run_engine(cfg,
callbacks=[...])``, in-process engine) or names them in the run config, which works on
every engine: ``tensorboard = "DIR"``, ``mlflow = "URI"`` (or ``"auto"``), and
``callbacks = "pkg.mod:MyCallback,..."`` (each a class or factory called with no
arguments, imported as Flower imports an app's components). ``fedsim run`` sets them with
``--tensorboard DIR``, ``--mlflow [URI]`` and ``--callback pkg.mod:attr``.
"""

from __future__ import annotations

from fedsim.callbacks.base import Callback, RoundEnd, RunEnd, RunStart
from fedsim.config import ConfigError, RunConfig
from fedsim.plugins import load_attr
from fedsim.validation import callback_paths

__all__ = ["Callback", "RoundEnd", "RunEnd", "RunStart", "check_named_callbacks", "named_callbacks"]


def named_callbacks(cfg: RunConfig) -> list[Callback]:
    """The callbacks the run config names (module docstring), built now: a missing package
    or a user callback that does not import or build is a ConfigError of one line."""
    out: list[Callback] = []
    if cfg.tensorboard:
        from fedsim.callbacks.tensorboard import TensorBoard  # lazy: imports torch's tensorboard writer

        out.append(TensorBoard(cfg.tensorboard))
    if cfg.mlflow:
        from fedsim.callbacks.mlflow import MLflow  # lazy: mlflow is an optional extra

        out.append(MLflow(cfg.mlflow))
    for path in callback_paths(cfg):
        out.append(_user_callback(path))
    return out


def check_named_callbacks(cfg: RunConfig) -> None:
    """Raise ConfigError now, before any folder or process starts, if a callback the run
    config names cannot be made: its package is missing or its module does not import
    (what a user's factory does when called is only known at the run's start)."""
    if cfg.tensorboard:
        from fedsim.callbacks.tensorboard import summary_writer_class  # lazy: as named_callbacks

        summary_writer_class()
    if cfg.mlflow:
        from fedsim.callbacks.mlflow import mlflow_module  # lazy: as named_callbacks

        mlflow_module()
    for path in callback_paths(cfg):
        load_attr(path, "callbacks")


def _user_callback(path: str) -> Callback:
    """The callback a user's ``"module:attr"`` names: a class or factory called with no
    arguments; what it returns must have the three methods."""
    factory = load_attr(path, "callbacks")
    try:
        made = factory() if callable(factory) else factory
    except Exception as err:
        raise ConfigError(f"callbacks: building {path!r} failed: {type(err).__name__}: {err}") from None
    missing = [m for m in ("on_run_start", "on_round_end", "on_run_end") if not callable(getattr(made, m, None))]
    if missing:
        raise ConfigError(f"callbacks: {path!r} gave a {type(made).__name__} without {missing}; subclass fedsim.callbacks.Callback")
    return made
