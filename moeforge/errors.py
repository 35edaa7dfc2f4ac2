"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug."""


def one_line(text: str) -> str:
    """``text`` with control characters (newlines included) escaped, so it prints as one line."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class UserError(Exception):
    """Bad input (a file, a flag, a checkpoint): the message names it and says what is wrong.

    The message is kept to one line even when it quotes user input (a config key or a
    file name with a newline in it is shown escaped)."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (one_line(args[0]),)
        super().__init__(*args)


class ConfigError(UserError, ValueError):
    """A configuration problem, reported as one line naming the field."""


def require(cond: bool, msg: str) -> None:
    """Config validation: raise :class:`ConfigError` with ``msg`` unless ``cond``."""
    if not cond:
        raise ConfigError(msg)
