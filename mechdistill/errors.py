"""User-facing errors: every message names the file, the row (when there is one) and the fix."""

from __future__ import annotations


class MechdistillError(Exception):
    """Base class for errors caused by user input or configuration, not by a bug."""


class ConfigError(MechdistillError):
    """A config key is unknown, missing, of the wrong type, or refers to something undefined."""


class InputError(MechdistillError):
    """An input file is missing, malformed, or has a bad row."""

    def __init__(self, message: str, *, file: str | None = None, row: int | str | None = None,
                 fix: str | None = None) -> None:
        parts = []
        if file is not None:
            parts.append(str(file))
        if row is not None:
            parts.append(f"row {row}")
        where = (", ".join(parts) + ": ") if parts else ""
        text = where + message
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)
        self.file, self.row, self.fix = file, row, fix
