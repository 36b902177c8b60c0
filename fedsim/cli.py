"""The ``fedsim`` command.

    fedsim run experiments/X.toml [--set key=value ...] [--engine inprocess|flower]
                                  [--results-dir DIR] [--workers N] [--threads N]
    fedsim sweep experiments/sweeps/Y.toml [--dry-run] [--set ...] [--engine ...]
                                  [--ray [ADDRESS] [--ray-cpus-per-run N] [--ray-gpus-per-run G] [--ray-memory-per-run GB]]
    fedsim store runs/Y docs/results/runs/Y     # finished runs' small files, to commit
    fedsim new my-app                           # a Flower app that uses fedsim (task.py: Net, load_data)
    fedsim split X.toml devices/ [--test-fraction F]   # one save_to_disk folder per device

An experiment is a Flower run-config TOML (flat kebab-case keys, the file
``flwr run . --run-config experiments/X.toml`` reads too). ``inprocess`` (default) runs it
on fedsim's in-process engine with a progress bar; ``flower`` runs it through Flower's
simulation runtime (Ray), starting and stopping a private SuperLink. Both go through
``fedsim.engine.run_engine``, which records the engine settings in summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from fedsim.algorithms.memory import check_state_fits, state_clients
from fedsim.callbacks import Callback, check_named_callbacks
from fedsim.config import ConfigError, RunConfig, parse_override, read_experiment
from fedsim.data.errors import DataError
from fedsim.engine import ENGINES, check_engine_options, run_engine
from fedsim.engine.processes import Terminated, stop_signals_interrupt
from fedsim.errors import RunFailed
from fedsim.plan import own_data, server_plan
from fedsim.run_folder import RunFolder, claim_run_folder
from fedsim.validation import load_config


def default_results_dir(experiment: Path) -> Path:
    """A new folder ``runs/<experiment>-<date>-<time>[-k]``, created here so that two runs
    started in the same second never share it."""
    stem = Path("runs") / f"{experiment.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        folder = stem if k == 1 else stem.with_name(f"{stem.name}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new results folder next to {stem}")


def tracking_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config keys that ``--tensorboard``, ``--mlflow`` and ``--callback`` set."""
    out: dict[str, Any] = {}
    if args.tensorboard:
        out["tensorboard"] = str(Path(args.tensorboard).resolve())
    if args.mlflow is not None:
        from fedsim.callbacks.mlflow import default_tracking_uri  # lazy: only for --mlflow (mlflow itself loads later)

        out["mlflow"] = args.mlflow or default_tracking_uri()
    if args.callback:
        out["callbacks"] = ",".join(args.callback)
    return out


def flower_app(experiment: str) -> Path | None:
    """The app's folder when ``experiment`` is a Flower app (its folder or its
    ``pyproject.toml``), else None (a run-config TOML)."""
    path = Path(experiment)
    if path.is_dir():
        return path.resolve()
    return path.resolve().parent if path.name == "pyproject.toml" else None


def use_app(app: Path, values: dict[str, Any]) -> None:
    """Run a Flower app's config as Flower would: its folder first on the import path (so
    ``model = "task:Net"`` finds its task.py), and its relative paths from its folder."""
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    for key in ("data-dir", "tensorboard"):
        if isinstance(values.get(key), str) and values[key] and not Path(values[key]).expanduser().is_absolute():
            values[key] = str(app / values[key])


def cmd_run(args: argparse.Namespace) -> int:
    args.workers, args.threads = check_engine_options(args.engine, args.workers, args.threads)
    if args.ray is not None and args.engine != "flower":
        raise ConfigError(
            f"--ray {args.ray}: a single run joins a Ray cluster through Flower's runtime; add --engine flower "
            "(to run in-process runs as Ray tasks, use fedsim sweep --ray)"
        )
    values = read_experiment(args.experiment)
    args.app = flower_app(args.experiment)
    if args.app is not None:
        use_app(args.app, values)
    for item in args.set or []:
        key, value = parse_override(item)
        values[key] = value
    values.update(tracking_overrides(args))
    cfg = load_config(values)  # a bad config fails here or in the next lines, before any folder is made
    plan = server_plan(cfg)
    if plan.device is not None:  # the server's per-client state must fit before any folder is made
        check_state_fits(cfg, plan.num_params, state_clients(cfg.num_nodes, own_data(cfg)), plan.device)
    check_named_callbacks(cfg)
    # --results-dir, else results-dir from --set or the experiment file, else a new folder
    given = args.results_dir or cfg.results_dir
    if given and Path(given).exists() and not Path(given).is_dir():
        raise ConfigError(f"results folder {given} is a file; give a folder (new or a run's) with --results-dir")
    results = Path(given) if given else default_results_dir(args.app or Path(args.experiment))
    cfg = dataclasses.replace(cfg, results_dir=str(results.resolve()))
    # The folder's lock (held until the run ends), --overwrite, and the refusal of a folder
    # holding another config's run: before either engine starts.
    with claim_run_folder(results, cfg, overwrite=args.overwrite):
        t0 = time.perf_counter()
        out = _execute(cfg, args)
    summary = RunFolder(out).read_summary()
    if summary is None:
        raise RunFailed(f"the run ended without a readable {RunFolder(out).summary}")
    print(f"fedsim: {cfg.strategy} on {cfg.dataset}: {_final_figure(out, summary)} after {summary['rounds']} rounds "
          f"({time.perf_counter() - t0:.1f} s); results in {out}")
    return 0


def _final_figure(folder: Path, summary: dict[str, Any]) -> str:
    """The final test accuracy, or, without a central test set, the last federated one."""
    acc = summary.get("final_test_accuracy")
    if isinstance(acc, float) and acc == acc:
        return f"final test accuracy {acc:.4f}"
    from fedsim.results import load_run  # lazy: pandas, only for a run without a central test set

    fed = load_run(folder).get("fed_accuracy")
    values = [] if fed is None else fed.dropna().tolist()
    return f"final federated accuracy {values[-1]:.4f}" if values else "no accuracy (neither central nor federated evaluation)"


def _execute(cfg: RunConfig, args: argparse.Namespace) -> Path:
    """Run ``cfg`` (results-dir set) on the engine and settings ``args`` names; its results
    folder. Raises RunFailed when the run ended without a usable result (summary.json says why)."""
    with _progress_bar(cfg, args.engine) as bar:
        return run_engine(
            cfg, args.engine, workers=args.workers, threads=args.threads, cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client, callbacks=bar, quiet=bool(bar), app=getattr(args, "app", None),
            ray_address=getattr(args, "ray", None),
        )


@contextmanager
def _progress_bar(cfg: RunConfig, engine: str) -> Iterator[list[Callback]]:
    """On the in-process engine, a progress bar callback (it replaces Flower's per-round
    INFO lines); none on Flower's runtime, whose log shows the rounds."""
    if engine != "inprocess":
        yield []
        return
    from fedsim.callbacks.builtin import ProgressBar  # lazy: tqdm is only needed for an in-process run

    bar = ProgressBar(cfg.num_server_rounds)
    try:
        yield [bar]
    finally:
        bar.bar.close()  # also when the run raised before its callbacks started


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import load_sweep, run_sweep  # lazy: only sweeps need it

    args.workers, args.threads = check_engine_options(args.engine, args.workers, args.threads)
    overrides = {**dict(parse_override(item) for item in args.set or []), **tracking_overrides(args)}
    runs = load_sweep(args.sweep, args.results_dir, overrides)
    if args.dry_run:
        for run in runs:
            print(f"{run.status():8s} {run.folder}")
        return 0

    if args.ray is not None:
        return _sweep_on_ray(runs, args)
    if args.ray_cpus_per_run is not None or args.ray_gpus_per_run is not None or args.ray_memory_per_run is not None:
        raise ConfigError("--ray-cpus-per-run, --ray-gpus-per-run and --ray-memory-per-run set the runs' Ray tasks: add --ray [ADDRESS]")

    failed: list[str] = []

    def execute(cfg: RunConfig) -> Path:
        try:
            return _execute(cfg, args)
        except RunFailed as err:  # reported, and the sweep goes on with its other runs
            print(f"fedsim: run failed: {err}", file=sys.stderr)
            failed.append(Path(cfg.results_dir).name)
            return Path(cfg.results_dir)

    results = [what for _, what in run_sweep(runs, execute)]
    busy = f", {results.count('busy')} left to other workers" if "busy" in results else ""
    print(
        f"fedsim: sweep of {len(runs)} runs: {results.count('ran')} ran, {results.count('skipped')} already done{busy}; "
        f"results in {runs[0].folder.parent}"
    )
    if failed:
        raise RunFailed(f"{len(failed)} run(s) of the sweep learned nothing: {', '.join(failed)} (see their summary.json)")
    return 0


def _sweep_on_ray(runs: list[Any], args: argparse.Namespace) -> int:
    """``fedsim sweep --ray``: the runs as Ray tasks (fedsim.sweep_ray)."""
    from fedsim.sweep_ray import RayOptions, run_sweep_on_ray  # lazy: imports Ray, only for --ray

    if args.engine != "inprocess":
        raise ConfigError("--ray runs each run of the sweep on the inprocess engine in a Ray task; --engine flower starts its own Ray")
    options = RayOptions(
        address=args.ray, cpus_per_run=1.0 if args.ray_cpus_per_run is None else args.ray_cpus_per_run,
        gpus_per_run=args.ray_gpus_per_run, workers=args.workers, threads=args.threads, memory_per_run=args.ray_memory_per_run,
    )
    outcomes = run_sweep_on_ray(runs, options)
    counts = {what: sum(o.what == what for o in outcomes) for what in ("ran", "skipped", "busy", "failed")}
    busy = f", {counts['busy']} left to other processes" if counts["busy"] else ""
    print(
        f"fedsim: sweep of {len(runs)} runs on Ray: {counts['ran']} ran, {counts['skipped']} already done{busy}, "
        f"{counts['failed']} failed; results in {runs[0].folder.parent}"
    )
    failed = [o for o in outcomes if o.what == "failed"]
    for o in failed:
        print(f"fedsim: run failed: {o.run.folder}" + (f" (on {o.node})" if o.node else "") + f": {o.error}", file=sys.stderr)
    if failed:
        raise RunFailed(f"{len(failed)} run(s) of the sweep failed: {', '.join(o.run.name for o in failed)} (see above)")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from fedsim.results import STORED_FILES, store_runs  # lazy: only `fedsim store` needs it

    copied = store_runs(args.source, args.dest)
    if not copied:
        print(f"fedsim store: no finished run (a folder with summary.json) in {args.source}", file=sys.stderr)
        return 1
    print(f"fedsim: stored {len(copied)} finished run(s) in {args.dest} ({', '.join(STORED_FILES)})")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    from fedsim.scaffold import new_app  # lazy: only `fedsim new` needs it

    path = new_app(args.folder)
    print(f"fedsim: wrote {path}/pyproject.toml, task.py, README.md; run it with `cd {args.folder} && flwr run .` or `fedsim run {args.folder}`")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from fedsim.split_data import split_for_devices  # lazy: only `fedsim split` needs it

    values = read_experiment(args.experiment)
    for item in args.set or []:
        key, value = parse_override(item)
        values[key] = value
    folders = split_for_devices(load_config(values), args.out, args.test_fraction)
    print(f"fedsim: wrote {len(folders)} device folders in {args.out} (see {args.out}/README.md)")
    return 0


def _engine_options(parser: argparse.ArgumentParser, results_help: str) -> None:
    """Options shared by ``run`` and ``sweep``: overrides, engine and its resources."""
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    parser.add_argument("--engine", choices=ENGINES, default="inprocess")
    parser.add_argument("--results-dir", help=results_help)
    parser.add_argument(
        "--workers",
        help="inprocess engine: auto (default: every core, planned per round) or clients on this many threads; same results; recorded in summary.json",
    )
    parser.add_argument(
        "--threads", type=_number(int, 1),
        help="inprocess engine: torch intra-op threads per worker (default 1; more lets torch split its sums, "
        "which changes results in the last bits); recorded in summary.json",
    )
    parser.add_argument("--cpus-per-client", type=_number(float, 0.0, strict=True), default=1.0, help="flower engine: Ray CPUs per client (> 0)")
    parser.add_argument(
        "--gpus-per-client", type=_number(float, 0.0),
        help="flower engine: Ray GPU share per client (>= 0; default: a share that fits all concurrent clients on the GPUs when CUDA is present, else 0)",
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks (also FEDSIM_DEBUG=1)")
    parser.add_argument("--tensorboard", metavar="DIR", help="write TensorBoard event files of each run under DIR (pip install 'fedsim[tensorboard]')")
    parser.add_argument(
        "--mlflow", nargs="?", const="", metavar="TRACKING_URI",
        help="log each run to MLflow (default: $MLFLOW_TRACKING_URI, else ./mlflow.db with artifacts in ./mlruns; pip install 'fedsim[mlflow]')",
    )
    parser.add_argument("--callback", action="append", metavar="MODULE:ATTR", help="a callback of yours (fedsim.callbacks.Callback), repeatable")


def _number(kind: type, low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``kind`` >= ``low`` (> ``low`` if ``strict``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {'>' if strict else '>='} {low:g}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``fedsim: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fedsim: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``fedsim`` command line: ``run``, ``sweep`` and ``store``."""
    parser = _Parser(prog="fedsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run an experiment TOML")
    run.add_argument("experiment", help="a Flower run-config TOML (experiments/quick.toml), or a Flower app's folder or pyproject.toml (its [tool.flwr.app.config])")
    run.add_argument(
        "--overwrite", action="store_true",
        help="start afresh in a results folder that holds a run of another config (its run files are deleted)",
    )
    _engine_options(run, results_help="where the run's folder goes (default runs/<experiment>-<time>)")
    run.add_argument(
        "--ray", metavar="ADDRESS",
        help="flower engine: Flower's simulation runtime joins this Ray cluster ('auto': the one started here with "
        "`ray start`; host:port: that head) and spreads the clients over its nodes; each node needs fedsim and the data",
    )
    run.set_defaults(func=cmd_run)
    sweep = sub.add_parser("sweep", help="run a grid of experiments; finished runs are skipped on rerun")
    sweep.add_argument("sweep", help="a sweep TOML (see fedsim/sweep.py), e.g. experiments/sweeps/fv_mnist_modes.toml")
    _engine_options(sweep, results_help="the sweep's folder (default: the file's results-dir, else runs/<name>)")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and their status, run nothing")
    sweep.add_argument(
        "--ray", nargs="?", const="", metavar="ADDRESS",
        help="run each pending run as a Ray task (inprocess engine): no ADDRESS starts a local Ray, 'auto' joins "
        "the cluster started here with `ray start`, host:port joins that head; the sweep folder must be on storage "
        "every node sees (checked at start)",
    )
    sweep.add_argument("--ray-cpus-per-run", type=_number(float, 0.0, strict=True), metavar="N", help="with --ray: CPUs each run's task declares (default 1)")
    sweep.add_argument(
        "--ray-memory-per-run", type=_number(float, 0.0, strict=True), metavar="GB",
        help="with --ray: GB of memory each run's task declares, so Ray puts no more runs on a node than fit (default: none declared)",
    )
    sweep.add_argument(
        "--ray-gpus-per-run", type=_number(float, 0.0), metavar="G",
        help="with --ray: GPU share each run's task declares (0.25: four runs per GPU; default 0 without GPUs, "
        "else the share that fills a GPU node's CPUs)",
    )
    sweep.set_defaults(func=cmd_sweep)
    store = sub.add_parser("store", help="copy finished runs' small files (no model, no checkpoint), e.g. into docs/results/runs/")
    store.add_argument("source", help="a run folder or a folder of runs (a sweep's results-dir)")
    store.add_argument("dest", help="where the copies go")
    store.set_defaults(func=cmd_store)
    new = sub.add_parser("new", help="write a Flower app that uses fedsim (pyproject.toml, task.py with Net and load_data, README)")
    new.add_argument("folder", help="the app's folder (new or empty); its name is the project's")
    new.set_defaults(func=cmd_new)
    split = sub.add_parser("split", help="write one save_to_disk folder per device, cut from an experiment's data as a run would partition it")
    split.add_argument("experiment", help="a run-config TOML (or a Flower app): its dataset, partitioning, num-nodes and seed")
    split.add_argument("out", help="an empty folder: out/device-0, out/device-1, ...")
    split.add_argument("--test-fraction", type=_number(float, 0.0), default=0.0, help="also a test split of this share of each device's data")
    split.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    split.set_defaults(func=cmd_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; a mistake in the user's input is one line on stderr and exit code 2,
    a run that learned nothing exit code 1; tracebacks only with --debug or FEDSIM_DEBUG=1."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("FEDSIM_DEBUG", "") not in ("", "0")
    before = os.environ.get("FEDSIM_DEBUG")
    if debug:
        os.environ["FEDSIM_DEBUG"] = "1"  # the engines read it too (a raising client's traceback)
    try:
        with stop_signals_interrupt():  # SIGTERM stops a run as Ctrl-C does: what it started is stopped too
            return int(args.func(args))
    except (ConfigError, DataError) as err:
        if debug:
            raise
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        if debug:
            raise
        print(f"fedsim: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"fedsim: {how}; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        if debug:
            raise
        print(
            f"fedsim: error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr
        )
        return 1
    finally:
        if before is None:
            os.environ.pop("FEDSIM_DEBUG", None)
        else:
            os.environ["FEDSIM_DEBUG"] = before


if __name__ == "__main__":
    sys.exit(main())
