"""Errors the command line reports as one line (exit status 2) instead of a traceback."""


class InputError(ValueError):
    """Bad user input: a file, folder, option or config value. The message names it and says what is wrong."""


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after saving a checkpoint; the command line exits 128 + signal
    (130 for Ctrl-C, 143 for SIGTERM), so ``iedp train ... && iedp evaluate ...`` does not carry on."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    def __reduce__(self) -> tuple:
        # Raised in the demo's worker processes and re-raised in the parent, so it must survive pickling.
        return (Interrupted, (self.signum, str(self)))
