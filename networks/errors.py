"""The error type of user input, at the lowest level that raises it (weights files here; data files in
:mod:`utils.data.io`, which re-exports it)."""


class InputError(Exception):
    """A problem with the user's data, files, weights or settings. The command-line tools report these in one line
    with what to do; any other exception is a bug and keeps its traceback."""
