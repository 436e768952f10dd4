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
from autodrop.config import (
    AUGMENTATIONS,
    DATA_ON_DEVICE,
    DEFAULT_LR,
    DEVICES,
    IN_BLOCK,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    PRUNERS,
    SAMPLERS,
    SCHEDULES,
    DataConfig,
    SearchConfig,
    TrainConfig,
    config_from_sources,
    model_label,
)
from autodrop.errors import AutodropError, AutodropWarning
from autodrop.nets.builtin import BUILTIN_MODELS

_DEFAULTS = SearchConfig()
_MODEL_HELP = (
    f"A built-in model ({', '.join(BUILTIN_MODELS)}), your own as path/to/file.py:ClassName or "
    "package.module:ClassName (a class or a function returning a module), or torchvision:NAME."
)
_BUILTIN_HELP = "\b\nBuilt-in models:\n" + "\n".join(
    f"  {name}: {entry.summary}" for name, entry in BUILTIN_MODELS.items()
)
_STUDY_HELP = "Study name; default: the storage's only study."
_STORAGE_HELP = "Optuna storage URL; default: sqlite file ./autodrop.db."
_TRUSTED_MODEL_HELP = ("The study's own model (FILE.py:Name, package.module:Name, torchvision:NAME), named again: "
                       "autodrop imports no code a study names. Not needed for a built-in model.")
_TRUSTED_DATA_HELP = ("The folder of images the study was searched on, named again (it must hold the same images): "
                      "autodrop reads no folder a study names. Not needed for the built-in digits.")
_IN_BLOCK_HELP = ("Sites inside a block class the model repeats (ResNet's BasicBlock), before each inner "
                  "convolution: one decision for all blocks of a stage, one per block, or none.")
_TRUSTED_MODEL_ARG_HELP = ("An argument of the study's own model, given again as the search got it (repeatable): "
                           "autodrop passes no argument a study names to your code.")
_PRECISION_HELP = ("Arithmetic of training and evaluation: fp32, bf16 autocast (weights, optimiser state, batch-norm "
                   "statistics and the loss stay float32), or auto: bf16 where the device computes it natively "
                   "(a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else fp32.")
_MODEL_ARG_HELP = "An argument for your model's constructor, e.g. --model-arg width=16 (repeatable)."


class UserInputError(click.ClickException):
    """An AutodropError at the CLI boundary: one line on stderr, exit code 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # The message may quote a study's stored text: no control character reaches the terminal,
        # and a newline in it would break the promise of one line.
        super().__init__(_printable(message.replace("\n", " ")))


def _printable(text: Any) -> str:
    from autodrop.outputs.text import printable

    return printable(text)


def _show_warning(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    if issubclass(category, AutodropWarning):
        click.echo(_printable(f"Warning: {message}"), err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="autodrop")
def main() -> None:
    """Find where dropout belongs in a CNN, and how strong it should be, with evidence."""
    warnings.showwarning = _show_warning


@main.command(epilog=_BUILTIN_HELP)
@click.option("--config", "spec", type=click.Path(dir_okay=False),
              help="A TOML study spec (see studies/); options given here override it.")
@click.option("--data", default=DataConfig.source, show_default=True,
              help="'digits' (built in) or a folder of class subfolders, or with train/ and val/.")
@click.option("--model", default=_DEFAULTS.model, show_default=True, help=_MODEL_HELP)
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE", help=_MODEL_ARG_HELP)
@click.option("--trials", type=int, default=_DEFAULTS.trials, show_default=True,
              help="Finished trials the study ends with (a rerun adds only what is missing).")
@click.option("--epochs", type=int, default=TrainConfig.epochs, show_default=True, help="Epochs per trial.")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=None,
              help="Peak learning rate.  [default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + "]")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=TrainConfig.optimizer, show_default=True,
              help="adam (AdamW when there is weight decay), or sgd with Nesterov momentum 0.9.")
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True,
              help="Decoupled weight decay (AdamW style): about 5e-4 with sgd, 0.05 with adam.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=TrainConfig.lr_schedule, show_default=True,
              help="How the learning rate moves, every batch: cosine warms up over the first 5% of the steps.")
@click.option("--label-smoothing", type=float, default=TrainConfig.label_smoothing, show_default=True,
              help="Share of each target spread over the other classes, in [0, 1).")
@click.option("--augment", default="none", show_default=True,
              help=f"none, or a comma-separated list of {', '.join(AUGMENTATIONS)} (training batches only). "
                   "flip,crop suits photos; leave digits and text unflipped.")
@click.option("--precision", type=click.Choice(PRECISIONS), default=TrainConfig.precision, show_default=True,
              help=_PRECISION_HELP + " A study keeps the precision it was made in; naming another is refused.")
@click.option("--rate-range", type=(float, float), default=_DEFAULTS.rate_range, show_default=True,
              help="Lowest and highest dropout rate searched.")
@click.option("--kinds", default=",".join(_DEFAULTS.kinds), show_default=True,
              help="Dropout kinds searched at conv sites (comma-separated): element, channel (whole maps), branch "
                   "(a residual block's whole branch per image, at sites after a residual sum); 'element' alone "
                   "switches this off.")
@click.option("--in-block", type=click.Choice(IN_BLOCK), default=_DEFAULTS.in_block, show_default=True,
              help=_IN_BLOCK_HELP)
@click.option("--slots", "--orders", "slots", default=",".join(_DEFAULTS.slots), show_default=True,
              help="Slots searched for conv sites with batch norm; 'after-act' alone switches this off "
                   "(--orders is its earlier name).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=TrainConfig.schedule, show_default=True,
              help="Dropout for the whole run, or only its first half ('early dropout').")
@click.option("--pruner", type=click.Choice(PRUNERS), default=_DEFAULTS.pruner, show_default=True,
              help="noise: stop a trial only when it is behind the typical trial by more than the noise of "
                   "one reading, and not before two thirds of the epochs.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=_DEFAULTS.sampler, show_default=True,
              help="tpe: grouped multivariate TPE; random: random search (a yardstick).")
@click.option("--image-size", type=int, default=DataConfig.image_size, show_default=True,
              help="Images are resized to this many pixels per side.")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              help="Force gray (1) or colour (3); default: picked from the data.")
@click.option("--val-fraction", type=float, default=DataConfig.val_fraction, show_default=True,
              help="Share of each class held out for validation (folders without val/).")
@click.option("--train-per-class", type=int, default=None,
              help="Keep at most this many training images per class.")
@click.option("--device", type=click.Choice(DEVICES), default=TrainConfig.device, show_default=True)
@click.option("--data-on-device", type=click.Choice(DATA_ON_DEVICE), default=TrainConfig.data_on_device,
              show_default=True,
              help="Copy the images to the GPU (yes), or keep them in this machine's memory and copy each batch "
                   "over (no); auto copies them when they fit in half the GPU's free memory. On a CPU the images "
                   "are read where they lie, from the shared decoded-image cache.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True)
@click.option("--study", default=None, help="Study name; default: made from the data and model.")
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--timeout", type=float, default=None, help="Seconds after which no new trial starts.")
@click.option("--artifact-dir", default=None,
              help="Folder for the best trials' weights; default: beside the SQLite file, or ./autodrop-artifacts.")
@click.option("--workers", type=click.IntRange(min=1), default=_DEFAULTS.workers, show_default=True,
              help="Worker processes to start here, all on the one study (more machines: run the command on each).")
@click.option("--devices", default=None,
              help="Devices for the workers in turn, e.g. cuda:0,cuda:1; default: --device for all.")
@click.option("--pack", type=click.IntRange(min=1), default=None,
              help="Trials trained at once as one packed network (each still its own trial). "
                   "Default: 8 per GPU, shared among the workers on it; 1 on a CPU.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for running trials' per-epoch checkpoints; default: autodrop-checkpoints/ next to an "
                   "SQLite file, else in the working directory. Share it between machines to resume across them.")
@click.option("--create-only", is_flag=True,
              help="Create the study (settings, baselines) and exit, so that workers started next only join it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def search(ctx: click.Context, spec: str | None, quiet: bool, model_arg: tuple[str, ...], create_only: bool,
           **options: Any) -> None:
    """Search where dropout should go, and how strong, on your data and model."""
    from autodrop.outputs.text import format_result

    try:
        given = {name: value for name, value in options.items()
                 if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT}
        config = config_from_sources(spec, given, model_arg)
        if create_only:
            from autodrop.run.search import create_study

            n_queued, n_other = create_study(config)
            from autodrop.run.storage import safe_url

            click.echo(
                f"Study {config.study_name!r} is ready in {safe_url(config.storage_url)}: {n_queued} trial(s) "
                f"queued, {n_other} started or finished."
            )
            click.echo("Start workers (here or on other machines) with the same options, without --create-only.")
            return
        from autodrop.api import search as run_search
        from autodrop.run.progress import BarProgress, Progress

        result = run_search(config=config, progress=Progress() if quiet else BarProgress())
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    except KeyboardInterrupt as e:
        click.echo(
            "\nInterrupted: finished trials are kept in the study, and running ones are queued again (a lone trial "
            "resumes from its last finished epoch, packed ones start over); run the same command again to resume.",
            err=True,
        )
        # 130 for Ctrl-C, 143 for SIGTERM: the shell's convention for a process a signal ended.
        sys.exit(getattr(e, "exit_code", 130))
    click.echo(format_result(result))
    click.echo("")
    from autodrop.run.storage import safe_url

    shown = safe_url(result.storage_url)
    click.echo(f"Stored as study {result.study_name!r} in {shown}")
    where = f"--study {shlex.quote(result.study_name)} --storage {shlex.quote(shown)}"
    click.echo(f"Look further: autodrop report {where} --html report.html   (or: autodrop dashboard {where})")


_ARTIFACT_HELP = "Folder of the kept weights; default: the one the search recorded."


@main.command()
@click.option("--study", default=None, help=_STUDY_HELP)
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a self-contained HTML page (works offline).")
@click.option("--model", default=None, help=_TRUSTED_MODEL_HELP)
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE", help=_TRUSTED_MODEL_ARG_HELP)
def report(study: str | None, storage: str | None, html_path: str | None, model: str | None,
           model_arg: tuple[str, ...]) -> None:
    """Print a study's answer from storage; --html also writes a page."""
    from autodrop.outputs.page import make_report

    try:
        result = make_report(study, storage, html_path=html_path, model=model, model_args=model_arg)
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    click.echo(result.text)
    if result.html_path is not None:
        click.echo("")
        click.echo(f"Wrote the report page to {result.html_path}")


@main.command()
@click.option("--study", default=None, help=_STUDY_HELP)
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 makes the dashboard reachable from other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0 picks a free one).")
@click.option("--artifact-dir", default=None, help=_ARTIFACT_HELP)
def dashboard(study: str | None, storage: str | None, host: str, port: int, artifact_dir: str | None) -> None:
    """Serve optuna-dashboard on a study; Ctrl-C stops it."""
    from autodrop.outputs.dashboard import is_loopback, run_dashboard

    if not is_loopback(host):
        # optuna-dashboard has no login: its upload, delete and note endpoints are open to every caller.
        click.echo(
            f"Warning: --host {host} serves the dashboard beyond this machine: anyone who can reach "
            f"{f'port {port}' if port else 'its port'} can upload and delete artifacts and edit notes.",
            err=True,
        )

    def ready(running: Any) -> None:
        click.echo(f"Dashboard for study {running.dashboard.study_name!r}: {running.url}")
        if running.dashboard.artifact_dir is None:
            click.echo("(no kept weights were found, so the dashboard lists no artifacts)")
        click.echo("Press Ctrl-C to stop.")

    try:
        run_dashboard(study, storage, host=host, port=port, artifact_dir=artifact_dir, on_ready=ready)
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    click.echo("Dashboard stopped.")


@main.command()
@click.option("--study", default=None, help=_STUDY_HELP)
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--trial", type=click.IntRange(min=0), default=None,
              help="Trial number to export; default: the best completed trial.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Python file to write the network to.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Also write the trial's trained weights (a state dict) here.")
@click.option("--artifact-dir", default=None, help=_ARTIFACT_HELP)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where to retrain when the trial's weights were not kept.")
@click.option("--model", default=None, help=_TRUSTED_MODEL_HELP)
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE", help=_TRUSTED_MODEL_ARG_HELP)
@click.option("--data", default=None, help=_TRUSTED_DATA_HELP)
def export(study: str | None, storage: str | None, trial: int | None, out: str, weights: str | None,
           artifact_dir: str | None, device: str, model: str | None, model_arg: tuple[str, ...],
           data: str | None) -> None:
    """Write a trial's network as PyTorch source, and its weights."""
    from autodrop.outputs.export import export_model

    try:
        result = export_model(study, storage, out=out, trial=trial, weights=weights, artifact_dir=artifact_dir,
                              device=device, model=model, data=data, model_args=model_arg)
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    click.echo(_printable(result.describe()))


@main.command()
@click.option("--study", "study_name", default=None, help=_STUDY_HELP)
@click.option("--storage", default=None, help=_STORAGE_HELP)
@click.option("--seeds", type=int, default=None,
              help="Fresh seeds for every placement; default: add seeds until the lead is decided, settled within "
                   "1 point, or --max-seeds is reached.")
@click.option("--max-seeds", type=int, default=10, show_default=True, help="The cap when seeds are added as needed.")
@click.option("--top", type=int, default=3, show_default=True, help="Best searched placements to retrain.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help=_PRECISION_HELP + "  [default: the study's own]")
@click.option("--pack", type=click.IntRange(min=1), default=None,
              help="Seeds of one placement trained at once as one packed network, each as it would train alone. "
                   "Default: as search packs trials (8 per GPU, 1 on a CPU).")
@click.option("--model", default=None, help=_TRUSTED_MODEL_HELP)
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE", help=_TRUSTED_MODEL_ARG_HELP)
@click.option("--data", default=None, help=_TRUSTED_DATA_HELP)
@click.option("--quiet", is_flag=True, help="No progress lines.")
def confirm(study_name: str | None, storage: str | None, seeds: int | None, max_seeds: int, top: int, device: str,
            precision: str | None, pack: int | None, model: str | None, model_arg: tuple[str, ...], data: str | None,
            quiet: bool) -> None:
    """Retrain the top placements and every baseline with fresh seeds, and test the lead."""
    from autodrop.outputs.text import format_confirmation

    def on_run(label: str, seed_index: int) -> None:
        if not quiet:
            click.echo(_printable(f"  training {label}, seed {seed_index + 1}"), err=True)

    def on_note(text: str) -> None:
        if not quiet:
            click.echo(f"  {text}", err=True)

    try:
        from autodrop.run.confirm import confirm_study

        confirmation = confirm_study(study_name, storage, n_seeds=seeds, max_seeds=max_seeds, top=top, device=device,
                                     precision=precision, pack=pack, model=model, model_args=model_arg, data=data,
                                     on_run=on_run, on_note=on_note)
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    click.echo(format_confirmation(confirmation.to_dict()))
    click.echo("\nStored with the study; autodrop report shows it from now on.")


@main.command(epilog=_BUILTIN_HELP)
@click.option("--config", "spec", type=click.Path(dir_okay=False),
              help="A TOML study spec: its model, model-args, image-size and channels are used.")
@click.option("--model", default=None, help=_MODEL_HELP + f"  [default: {_DEFAULTS.model}]")
@click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE", help=_MODEL_ARG_HELP)
@click.option("--image-size", type=click.IntRange(8, 1024), default=None,
              help=f"Pixels per side of the images the model gets.  [default: {DataConfig.image_size}]")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="Gray (1) or colour (3).  [default: 3]")
@click.option("--classes", type=click.IntRange(2, 100_000), default=10, show_default=True,
              help="Number of classes the model is built for.")
@click.option("--in-block", type=click.Choice(IN_BLOCK), default=None,
              help=_IN_BLOCK_HELP + f"  [default: {_DEFAULTS.in_block}]")
def sites(spec: str | None, model: str | None, model_arg: tuple[str, ...], image_size: int | None,
          channels: str | None, classes: int, in_block: str | None) -> None:
    """List the candidate drop sites autodrop finds in a model, without training anything."""
    given = {key: value for key, value in (("model", model), ("image-size", image_size), ("channels", channels),
                                           ("in-block", in_block))
             if value is not None}
    try:
        config = config_from_sources(spec, given, model_arg)
        from autodrop.nets.build import list_sites
        from autodrop.nets.discovery import format_sites

        found, shape = list_sites(config, n_classes=classes)
    except AutodropError as e:
        raise UserInputError(str(e)) from e
    size = f"{shape.channels}x{shape.image_size}x{shape.image_size}"
    title = f"Model {model_label(config.model)}: input {size}, {shape.n_classes} classes"
    click.echo(format_sites(found, title=title))


if __name__ == "__main__":  # pragma: no cover
    main()
