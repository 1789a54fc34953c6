"""Errors meant for the user: the CLI prints `error: <message>` and the app shows
the message; neither shows a traceback for these.

core/ never names a CLI flag or an app widget. A message (or a warning or note
that core yields as text) names a setting by placeholder, and each front end
renders it in its own words:
  {setting}           the error's own field            CLI: --lr      app: 'Learning rate'
  {setting:FIELD}     another setting                  {setting:trust_pickle}
  {choice:FIELD=VAL}  a setting with a value           CLI: --weights none
`render(text, names, choices, field)` fills them: names maps a field to its
screen name (missing: the bare field name); choices maps (field, value) to the
wording of that setting-and-value (missing: "<name> <value>")."""
from __future__ import annotations

import re
from typing import Mapping

_PLACEHOLDER = re.compile(r"\{(setting|choice)(?::([a-z_]+)(?:=([^{}]*))?)?\}")


def render(text: str, names: Mapping[str, str] | None = None,
           choices: Mapping[tuple[str, str], str] | None = None, field: str | None = None) -> str:
    """`text` with its {setting}/{setting:F}/{choice:F=V} placeholders in a front end's words."""
    names, choices = names or {}, choices or {}

    def word(m: re.Match) -> str:
        kind, name, value = m.group(1), m.group(2) or field, m.group(3)
        label = names.get(name, name or "the setting")
        if kind == "choice" and value is not None:
            return choices.get((name, value), f"{label} {value}")
        return label

    return _PLACEHOLDER.sub(word, text)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line: for error messages that
    quote a library's reason without its multi-line detail."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:limit]


class UserError(Exception):
    """Bad input or environment; the message says what was wrong and what is allowed.
    field: the setting it is about (a TrainConfig field name, or "checkpoint",
    "image", "csv", ...); value: the value given; allowed: what would be accepted.
    str(err) renders placeholders with bare field names; front ends call render()."""

    def __init__(self, message: str, *, field: str | None = None, value=None, allowed=None):
        super().__init__(message)
        self.message, self.field, self.value, self.allowed = message, field, value, allowed

    def render(self, names: Mapping[str, str] | None = None,
               choices: Mapping[tuple[str, str], str] | None = None) -> str:
        return render(self.message, names, choices, self.field)

    @property
    def template(self) -> str:
        """The message with its own {setting} named explicitly, for quoting inside another error's message."""
        return self.message.replace("{setting}", f"{{setting:{self.field}}}") if self.field else self.message

    def __str__(self) -> str:
        return self.render()


class ConfigError(UserError):
    pass


class DatasetError(UserError):
    pass


class ImageLoadError(UserError):
    def __init__(self, path, reason):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}", field="image", value=str(path))


class WeightsError(UserError):
    pass


class CheckpointError(UserError):
    pass
