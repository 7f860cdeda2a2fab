"""Command line: ``python -m lowrank COMMAND ...`` (also installed as ``lowrank``).

    python -m lowrank data mnist                         # fetch, check and cache a dataset
    python -m lowrank train notebooks/configs/fig.toml   # train every model of a config file
    torchrun --nproc_per_node=2 -m lowrank train fig.toml   # the same on 2 processes (lowrank.engine.distributed)
    python -m lowrank report [--quick] [--jobs N]        # every figure notebook, then the book
    python -m lowrank notebooks                          # refresh the notebooks' stored (nbval) outputs
    python -m lowrank benchmark [--full] [--device cuda] # time a training step against dense (lowrank.engine.experiments.benchmark)

Each command is a ``cmd_<name>(args) -> exit status`` function plus one ``add_parser`` entry in
:func:`build_parser`. Configuration errors print their message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowrank.engine import report

from lowrank.engine.config import DATASETS, QUICK, ConfigError, count

# Columns of the printed history table and how each is written.
TABLE_FORMATS = {
    "epoch": "{:d}".format,
    "train_loss": "{:.4f}".format,
    "train_accuracy": "{:.4f}".format,
    "val_loss": "{:.4f}".format,
    "val_accuracy": "{:.4f}".format,
    "train_seconds": "{:.2f}".format,
    "epoch_seconds": "{:.2f}".format,
}


def cmd_data(args: argparse.Namespace) -> int:
    from lowrank.engine import data

    datasets = args.datasets or ["mnist"]
    for dataset in datasets:
        if dataset not in DATASETS:
            print(f"error: unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}", file=sys.stderr)
            return 2
    for dataset in datasets:
        try:
            path = data.prepare(dataset)
        except (data.DataUnavailableError, data.DataIntegrityError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{dataset}: {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lowrank.engine import config

    study = config.load(args.config)
    models = study.models
    if args.model is not None:
        models = tuple(m for m in models if m.name == args.model)
        if not models:
            names = " | ".join(f'"{m.name}"' for m in study.models)
            raise ConfigError(f'{args.config}: no model named "{args.model}"; allowed: {names}')
    given = {"num_epochs": ("--epochs", args.epochs), "subset": ("--subset", args.subset),
             "device": ("--device", args.device)}
    overrides = {key: value for key, (_, value) in given.items() if value is not None}
    try:
        models = [m.with_settings(**overrides) if overrides else m for m in models]
    except ConfigError as error:  # name the options, not only the model's settings they replaced
        options = " ".join(f"{given[key][0]} {value}" for key, value in overrides.items())
        raise ConfigError(f"{args.config} with {options}: {error}") from None
    show_bar = args.progress or sys.stderr.isatty()
    # after the config checks: importing torch takes seconds
    from lowrank.engine import data, determinism, distributed, training

    for model in models:
        try:
            determinism.resolve_device(model.settings.device)
        except determinism.DeviceUnavailableError as error:
            raise ConfigError(f'{args.config}: model "{model.name}": settings.device = "{model.settings.device}" '
                              f'(or --device): {error}, or "auto" (cuda where there is one)') from None

    # Under torchrun: join its process group (lowrank.engine.distributed); only rank 0 prints. Alone: nothing changes.
    with distributed.launch() as world:
        for model in models:
            def print_epoch(row: dict, name=model.name, epochs=model.settings.total_epochs) -> None:
                """One line per epoch on stderr where there is no progress bar (logs, nohup)."""
                ranks = ",".join(str(value) for key, value in row.items() if key.startswith("rank_"))
                print(f"{name}: epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  "
                      f"val_accuracy {row['val_accuracy']:.4f}  ranks {ranks}  {row['epoch_seconds']:.1f} s",
                      file=sys.stderr, flush=True)

            try:
                result = training.train(model, args.out, force=args.force, progress=show_bar, threads=args.threads,
                                        on_epoch=None if show_bar or not world.main else print_epoch)
            except (training.TrainingDivergedError, data.DataUnavailableError, data.DataIntegrityError) as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            if world.main:
                print(format_result(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    try:
        report.run(quick=args.quick, force=args.force, jobs=args.jobs, only=args.only, build=args.build,
                   results_dir=args.out)
    except report.FigureFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_notebooks(args: argparse.Namespace) -> int:
    report.refresh_notebooks(only=args.only)
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from lowrank.engine.experiments import benchmark

    benchmark.main(args.options)
    return 0


def format_result(result) -> str:
    """A readable summary of a :class:`lowrank.engine.training.TrainingResult`: history table, test metrics, folder."""
    history = result.history
    ranks = [c for c in history.columns if c.startswith("rank_")]
    table = history[list(TABLE_FORMATS) + ranks].to_string(index=False, formatters=TABLE_FORMATS)
    source = "cached result, --force to train again" if result.cached else "saved"
    return (
        f"\n{result.config.name} ({result.config.cache_key()})\n{table}\n"
        f"test_accuracy {result.test_accuracy:.4f}  test_loss {result.test_loss:.4f}  "
        f"parameters {int(history['parameters'].iloc[-1])}  compression {history['compression'].iloc[-1]:.3f}\n"
        f"{source}: {result.path}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank",
        description="Dense, low-rank and dynamical low-rank (DLRT) MLPs on MNIST: data, training, report.",
    )
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("data", help="download/check/cache a dataset (offline sources, checksummed)",
                            description="Fetch, verify and cache datasets so that training runs offline.")
    # Names are checked in cmd_data: with nargs="*", Python 3.11's argparse checks [] against choices.
    p.add_argument("datasets", nargs="*", metavar="DATASET",
                   help=f"one or more of {', '.join(DATASETS)} (default: mnist)")
    p.set_defaults(run=cmd_data)

    p = commands.add_parser(
        "train", help="train the models of a TOML config and cache their histories",
        description="Train every model of CONFIG (or the one named by --model), print each history and its "
                    "test accuracy. Finished runs are cached under OUT/<name>-<cache key>/ and returned without "
                    "training; interrupted runs resume from their last epoch. Under `torchrun --nproc_per_node=N -m "
                    "lowrank train CONFIG.toml` the N processes train data-parallel, each on its share of every batch "
                    "of N * batch_size images (see lowrank.engine.distributed).")
    p.add_argument("config", metavar="CONFIG.toml", help="experiment configuration (see lowrank.engine.config)")
    p.add_argument("--model", metavar="NAME", help="train only the model with this name")
    p.add_argument("--epochs", type=int, metavar="N", help="override settings.num_epochs")
    p.add_argument("--subset", type=int, metavar="N", help="override settings.subset: train on N images drawn with the seed")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="override settings.device")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="results directory (default: $LOWRANK_RESULTS or ./results)")
    p.add_argument("--force", action="store_true", help="train again even if a cached result exists")
    p.add_argument("--progress", action="store_true", help="show progress bars even if stderr is not a terminal")
    p.add_argument("--threads", type=count, default=1, metavar="N",
                   help="CPU threads for torch (default: 1, fastest for these small networks)")
    p.set_defaults(run=cmd_train)

    p = commands.add_parser(
        "report", help="execute every figure notebook with papermill, then build the book",
        description="Train every model of the figures' TOML configs (N at a time, the longest first; models in the "
                    "results cache are reused), execute notebooks/fig_*.ipynb into book/figures/ (N at a time), "
                    "then run `jb build book/`. Run from the repository root.")
    p.add_argument("--quick", action="store_true",
                   help=f"train on {QUICK['subset']} images for {QUICK['num_epochs']} epochs "
                        f"in {QUICK['dtype']} (a fast end-to-end check; the notebooks' stored outputs)")
    p.add_argument("--force", action="store_true", help="retrain every model even if a cached result exists")
    p.add_argument("--jobs", type=count, default=1, metavar="N", help="models trained, then figures executed, in parallel (default: 1)")
    p.add_argument("--only", nargs="+", metavar="FIGURE", default=(), help="run only these figures, e.g. fig_a")
    p.add_argument("--no-build", dest="build", action="store_false", help="skip `jb build book/`")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="results directory (default: $LOWRANK_RESULTS or ./results)")
    p.set_defaults(run=cmd_report)

    p = commands.add_parser(
        "notebooks", help="re-execute the figure notebooks in place with their quick defaults (for nbval)",
        description="Store fresh outputs in notebooks/fig_*.ipynb: the reference that `pytest --nbval notebooks` "
                    "compares against. Run it after a change that alters the results, then commit the notebooks.")
    p.add_argument("--only", nargs="+", metavar="FIGURE", default=(), help="only these figures, e.g. fig_a")
    p.set_defaults(run=cmd_notebooks)

    # lowrank.engine.experiments.benchmark parses its own options (`python -m lowrank benchmark --help`), so that this parser
    # loads without torch: with no option prefix here, every argument, --help too, is passed on to it.
    p = commands.add_parser("benchmark", help="time, measure and profile one training step against torch dense",
                            add_help=False, prefix_chars="+")
    p.add_argument("options", nargs=argparse.REMAINDER, help="see `python -m lowrank benchmark --help`")
    p.set_defaults(run=cmd_benchmark)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
