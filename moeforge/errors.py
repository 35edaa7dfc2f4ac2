"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug."""


class UserError(Exception):
    """Bad input (a file, a flag, a checkpoint): the message names it and says what is wrong."""


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line naming the field."""
