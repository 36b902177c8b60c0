"""MLflow tracking of a run: its config as params, every metric of rounds.csv per round,
the summary and the results folder's small files as artifacts (``--mlflow [URI]`` or
``mlflow = "URI"``; ``"auto"``: MLflow's own default, ``$MLFLOW_TRACKING_URI`` or a local
``mlflow.db`` with artifacts in ``./mlruns``). A task's other metrics and federated
evaluation's figures are metrics too, under their rounds.csv column names.

Needs MLflow (``pip install 'fedsim[mlflow]'``: the ``mlflow-skinny`` client). The
experiment is "fedsim" (``$MLFLOW_EXPERIMENT_NAME`` wins), the run name the results
folder's. Metric keys are the rounds.csv columns, step = round; test metrics only in
evaluated rounds. The MLflow run ends FINISHED, or FAILED when the fedsim run failed or
raised.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from fedsim.callbacks.base import Callback, RoundEnd, RunEnd, RunStart
from fedsim.errors import ConfigError
from fedsim.results import COLUMNS, STORED_FILES


def default_tracking_uri() -> str:
    """MLflow's default store as seen from this directory: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<cwd>/mlflow.db`` (resolved here, so that a ServerApp running elsewhere
    under Flower's runtime logs to the same place)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlruns/`` beside a local SQLite store (as
    MLflow's default does from the directory it runs in); None: the store's own default."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
    return None


def mlflow_module() -> Any:
    """The mlflow package; ConfigError (one line, with the fix) if it is missing."""
    try:
        import mlflow  # lazy: an optional extra, slow to import
    except ImportError:
        raise ConfigError("mlflow tracking needs MLflow: pip install 'fedsim[mlflow]'") from None
    return mlflow


class MLflow(Callback):
    """Logs the run to an MLflow tracking store (module docstring)."""

    def __init__(self, tracking_uri: str = "auto") -> None:
        self.mlflow = mlflow_module()
        self.tracking_uri = default_tracking_uri() if tracking_uri in ("", "auto") else tracking_uri
        self.client: Any = None
        self.run_id: str | None = None

    def on_run_start(self, start: RunStart) -> None:
        mlflow = self.mlflow
        client = mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedsim")
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            experiment_id = client.create_experiment(name, artifact_location=artifact_root(self.tracking_uri))
        run_name = start.folder.name if start.folder is not None else None
        run = client.create_run(experiment_id, run_name=run_name, tags={"fedsim.first_round": str(start.first_round)})
        self.client, self.run_id = client, run.info.run_id
        params = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in sorted(start.cfg.to_mapping().items())]
        client.log_batch(self.run_id, params=params)

    def on_round_end(self, end: RoundEnd) -> None:
        entities = self.mlflow.entities
        stamp = int(time.time() * 1000)
        values = {c: float(getattr(end.row, c)) for c in COLUMNS if c != "round"} | end.row.extra
        metrics = [entities.Metric(c, v, stamp, end.row.round) for c, v in values.items() if not math.isnan(v)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def on_run_end(self, end: RunEnd) -> None:
        if self.client is None:
            return
        if end.summary is not None:
            self.client.log_dict(self.run_id, end.summary, "summary.json")
        if end.folder is not None:
            for name in STORED_FILES:
                if (end.folder / name).exists():
                    self.client.log_artifact(self.run_id, str(end.folder / name), artifact_path="results")
        self.client.set_terminated(self.run_id, "FINISHED" if end.status == "finished" else "FAILED")
