"""One error type for bad input, so entrypoints can print one clear line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class NapkitError(Exception):
    """A user-facing error: the message names the bad value and what would be valid."""


def unknown_choice(kind: str, value: object, choices: Iterable[str]) -> NapkitError:
    """Build the error for a name that is not one of the valid choices."""
    valid = ", ".join(sorted(choices))
    return NapkitError(f"unknown {kind} {value!r}; valid choices: {valid}")


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: unwind (MLflow run ended as KILLED, checkpoints kept), exit 128 + signal.

    A BaseException, so that library code catching ``Exception`` cannot swallow it.
    """

    def __init__(self, signum: int) -> None:
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
