"""Errors of the configuration-server client."""

from __future__ import annotations

from ferry.errors import FerryError, RetryableError

# -- errors -----------------------------------------------------------------------------


class ControlRefused(FerryError):
    """the configuration server refused {call}: {message} (HTTP {status})"""

    exit_code = 8

    @property
    def status(self) -> int:
        """The HTTP status of the refusal."""
        return int(str(self.fields["status"]))


class ControlUnavailable(RetryableError):
    """the configuration server at {server} is unavailable: {problem}"""


class CommandFailed(FerryError):
    """{detail}"""


class CredentialsInvalid(FerryError):
    """credentials file {path}: {problem}"""

    exit_code = 2
