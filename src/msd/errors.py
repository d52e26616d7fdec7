"""The exception type for mistakes a user can fix (bad paths, mismatched models, bad prompts)."""


class MSDError(Exception):
    """A user-facing error: the message names the wrong value and what to do about it.

    The command line prints these without a traceback. Any other exception is a bug in msd.
    """
