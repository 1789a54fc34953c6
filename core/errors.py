"""Errors meant for the user: the CLI prints `error: <message>` and the app shows
the message; neither shows a traceback for these."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line: for error messages that
    quote a library's reason without its multi-line detail."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:limit]


class UserError(Exception):
    """Bad input or environment; the message says what was wrong and what is allowed."""


class ConfigError(UserError):
    pass


class DatasetError(UserError):
    pass


class ImageLoadError(UserError):
    def __init__(self, path, reason):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


class WeightsError(UserError):
    pass


class CheckpointError(UserError):
    pass
