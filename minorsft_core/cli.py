"""The ``minorsft`` command. Stage commands take their options from the stage's config
dataclass (one source of truth for names, defaults and help), import their stage
lazily, and are the one place that maps the stages' typed errors
(``minorsft_core.errors``) to exit codes a batch system can act on."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Annotated

import typer

from minorsft_core.config import PrecomputeConfig, TrainConfig, load_config
from minorsft_core.errors import (
    EXIT_BAD_INPUT,
    EXIT_ENGINE,
    EXIT_IO,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    MinorSFTError,
    exit_code_for,
)

app = typer.Typer(
    help="MinorSFT fine-tuning (arXiv 2408.10642): precompute reference log-probs, then train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich's tables cut long flag names at 80 columns
    # ("--tensor-parallel-s…") and read "[default: x]" as markup and drop it.
    rich_markup_mode=None,
)

_OPTION_TYPES = {"int": int | None, "float": float | None, "str": str | None, "bool": bool | None}


def _fail(code: int, message: str) -> None:
    typer.echo(f"minorsft: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _root(
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """MinorSFT fine-tuning (arXiv 2408.10642): precompute reference log-probs, then train."""
    # The `deepspeed` launcher puts --local_rank=K right after the script, before the
    # subcommand; ranks read LOCAL_RANK from the environment, which every launcher sets,
    # so the flag is accepted here and ignored.


def _config_command(config_cls, runner_path: str, doc: str):
    """A typer command whose options are ``config_cls``'s fields plus ``--config YAML``."""
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=str | None,
            default=typer.Option(None, "--config", help="YAML file of options; flags given here override it"),
        )
    ]
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        # Every option's default is shown: from the field, or in its help text where it
        # is computed at run time (the field's default is then None).
        if f.type == "bool":
            shown = f" [default: {'on' if f.default else 'off'}]"
            option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text + shown, show_default=False)
        else:
            if f.metadata["required"]:
                shown = " [required]"  # on the command line or in the --config YAML
            elif f.default is None:
                shown = "" if "[default:" in help_text else " [default: none]"
            else:
                shown = f" [default: {f.default}]"
            option = typer.Option(None, flag, help=help_text + shown, show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=_OPTION_TYPES[f.type], default=option))

    def command(**options):
        config_path = options.pop("config")
        try:
            config = load_config(config_cls, config_path, options)
        except ConfigError as err:
            _fail(EXIT_USAGE, str(err))
        module_name, func_name = runner_path.split(":")
        runner = getattr(__import__(module_name, fromlist=[func_name]), func_name)
        try:
            code = runner(config)
        except (MinorSFTError, OSError) as err:
            code = exit_code_for(err)
            hint = ". Fix the file system and re-run the same command: finished work is kept." \
                if code == EXIT_IO else ""
            _fail(code, f"{err}{hint}")
        raise typer.Exit(code or EXIT_OK)

    command.__signature__ = inspect.Signature(params)
    command.__doc__ = doc
    return command


app.command("precompute", short_help="Stage one: reference log-probs into Parquet shards.")(_config_command(
    PrecomputeConfig, "precompute.run:main",
    "Stage one: score every sample with the frozen reference model into Parquet shards.",
))
app.command("train", short_help="Stage two: DeepSpeed training on the shards.")(_config_command(
    TrainConfig, "train.run:main",
    "Stage two: DeepSpeed ZeRO-3 training with MinorSFT / SFT / SFT-using-DPO on the shards.",
))


@app.command("plot", short_help="Figure 1 view (deviation, loss, coefficient) of runs.")
def plot(
    run_dirs: Annotated[list[str], typer.Argument(help="`minorsft train --output` directories")],
    out: Annotated[str, typer.Option("--out", help="image to write (.png, .pdf, .svg)")],
    title: Annotated[str | None, typer.Option("--title", help="figure title")] = None,
) -> None:
    """Deviation (Eq. 8), loss and mean coefficient against step for several runs (Figure 1)."""
    from minorsft_core.plot import plot_runs

    try:
        path = plot_runs(run_dirs, out, title)
    except FileNotFoundError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    typer.echo(f"wrote {path}")


@app.command("demo", short_help="Both stages end to end on the bundled default (CPU).")
def demo(
    output: Annotated[str, typer.Option("--output", help="directory for every output of the demo")] = "runs/demo",
    engine: Annotated[str, typer.Option("--engine", help="stage-one engine: auto, vllm or hf")] = "auto",
) -> None:
    """Both stages end to end on the bundled default (data/default, CPU): sft, minorsft, dpo_sft."""
    from pathlib import Path

    from minorsft_core.demo import require_checkout, run_demo

    try:
        require_checkout()
    except FileNotFoundError as err:
        _fail(EXIT_BAD_INPUT, str(err))
    try:
        run_demo(Path(output), engine=engine)
    except RuntimeError as err:
        _fail(EXIT_ENGINE, str(err))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
