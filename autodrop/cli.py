"""The ``autodrop`` command: parse options, call one library function, print its answer.

Torch is imported only by the commands that train, so ``autodrop --help`` starts fast.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from typing import Any

import click
from click.core import ParameterSource

from autodrop import __version__
from autodrop.config import DEVICES, PRUNERS, DataConfig, SearchConfig, TrainConfig, config_from_options, read_spec
from autodrop.errors import AutodropError, AutodropWarning

_DEFAULTS = SearchConfig()


class UserInputError(click.ClickException):
    """An AutodropError at the CLI boundary: one line on stderr, exit code 2."""

    exit_code = 2


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    if issubclass(category, AutodropWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="autodrop")
def main() -> None:
    """Find where dropout belongs in a CNN, and how strong it should be, with evidence."""
    warnings.showwarning = _show_warning


@main.command()
@click.option("--config", "spec", type=click.Path(dir_okay=False),
              help="A TOML study spec (see studies/); options given here override it.")
@click.option("--data", default=DataConfig.source, show_default=True,
              help="'digits' (built in) or a folder of class subfolders, or with train/ and val/.")
@click.option("--model", default=_DEFAULTS.model, show_default=True, help="A built-in model name.")
@click.option("--trials", type=int, default=_DEFAULTS.trials, show_default=True,
              help="Finished trials the study ends with (a rerun adds only what is missing).")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True, help="Epochs per trial.")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True, help="Adam learning rate.")
@click.option("--rate-range", type=(float, float), default=_DEFAULTS.rate_range, show_default=True,
              help="Lowest and highest dropout rate searched.")
@click.option("--pruner", type=click.Choice(PRUNERS), default=_DEFAULTS.pruner, show_default=True)
@click.option("--image-size", type=int, default=DataConfig.image_size, show_default=True,
              help="Images are resized to this many pixels per side.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Force gray (1) or colour (3); default: picked from the data.")
@click.option("--val-fraction", type=float, default=DataConfig.val_fraction, show_default=True,
              help="Share of each class held out for validation (folders without val/).")
@click.option("--train-per-class", type=int, default=None,
              help="Keep at most this many training images per class.")
@click.option("--device", type=click.Choice(DEVICES), default=TrainConfig.device, show_default=True)
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--study", default=None, help="Study name; default: made from the data and model.")
@click.option("--storage", default=None, help="Optuna storage URL; default: sqlite file ./autodrop.db.")
@click.option("--timeout", type=float, default=None, help="Seconds after which no new trial starts.")
@click.option("--pack", type=int, default=None,
              help="Train this many trials at once as one packed model (1 = one at a time); "
                   "default: automatic on a CUDA GPU, 1 elsewhere.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def search(ctx: click.Context, spec: str | None, quiet: bool, **options: Any) -> None:
    """Search where dropout should go, and how strong, on your data and model."""
    from autodrop.report import format_result

    try:
        given = read_spec(spec) if spec else {}
        for name, value in options.items():
            if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
                given[name.replace("_", "-")] = value
        if given.get("channels") is not None:
            given["channels"] = int(given["channels"])
        config = config_from_options(given)
        from autodrop.search import BarProgress, Progress, run_search

        result = run_search(config, progress=Progress() if quiet else BarProgress())
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    except KeyboardInterrupt:
        click.echo(
            "\nInterrupted: finished trials are kept in the study; run the same command again to resume.", err=True
        )
        sys.exit(130)
    click.echo(format_result(result))
    click.echo("")
    click.echo(f"Stored as study {result.study_name!r} in {result.storage_url}")
    click.echo(f"Look further: optuna-dashboard {shlex.quote(result.storage_url)}")


if __name__ == "__main__":  # pragma: no cover
    main()
