"""Errors the command line reports as one line (exit status 2) instead of a traceback."""


class InputError(ValueError):
    """Bad user input: a file, folder, option or config value. The message names it and says what is wrong."""
