"""The one domain error of qtool: a message that names the file, tensor or option, and a hint saying what
would be valid. The CLI turns it into one red line and exit code 2; library code never prints."""

from __future__ import annotations


class QtoolError(Exception):
    """A problem the user can fix. `message` names what is wrong; `hint` says what would be valid."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __str__(self) -> str:
        return self.one_line()
