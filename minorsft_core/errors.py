"""What can go wrong, and the exit code each failure ends a command with.

Stages raise these typed errors (or let the file system's ``OSError`` through); only
the command (``minorsft_core.cli``) turns an error into an exit code, with
``exit_code_for``. The codes are chosen for batch systems: retrying as is helps only
with ``EXIT_ENGINE`` and ``EXIT_PREEMPTED``; the others need a person to change
something first (``README.md`` lists them).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2  # bad option, config value or layout (batch sizes x ranks)
EXIT_BAD_INPUT = 3  # input data, model directory or stage-one output unusable as given
EXIT_ENGINE = 4  # the engine or trainer failed at run time
EXIT_DRIFT = 5  # stage two: step-one deviation over --drift-tolerance
EXIT_IO = 6  # file-system error (disk full, permissions, a file where a directory belongs)
EXIT_PREEMPTED = 143  # stage two: checkpointed on SIGTERM/SIGINT; re-run to resume


class MinorSFTError(Exception):
    """Base of the project's errors; ``exit_code`` is what the command exits with."""

    exit_code = EXIT_ENGINE


class ConfigError(MinorSFTError, ValueError):
    """An option or config value (or their combination with the launch) is invalid."""

    exit_code = EXIT_USAGE


class InputError(MinorSFTError, ValueError):
    """An input (data, model directory, tokenizer, stage-one output) cannot be used as given."""

    exit_code = EXIT_BAD_INPUT


class DataError(InputError):
    """The input data as a whole cannot be used; the message names the file and the fix."""


class ContractError(InputError):
    """Stage-one output that stage two must not train on. The message names the file
    (and row, where one is at fault) and says how to fix it."""


class EngineError(MinorSFTError, RuntimeError):
    """The scoring engine or the trainer failed at run time; a retry may help."""

    exit_code = EXIT_ENGINE


def exit_code_for(err: BaseException) -> int:
    """The exit code a command ends with after ``err``.

    A missing file is a missing input the user named (3); any other ``OSError`` is the
    file system's (disk full, permissions: 6), wherever it happens; anything else
    unexpected is a run-time failure (4).
    """
    if isinstance(err, MinorSFTError):
        return err.exit_code
    if isinstance(err, FileNotFoundError):
        return EXIT_BAD_INPUT
    if isinstance(err, OSError):
        return EXIT_IO
    return EXIT_ENGINE
