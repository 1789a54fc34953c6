"""Errors meant for the user: the CLI prints `error: <message>` and the app shows
the message; neither shows a traceback for these."""


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
