"""Errors of the configuration-server client."""

from __future__ import annotations

from ferry.errors import Exit, FerryError, RetryableError

# -- errors -----------------------------------------------------------------------------


class ControlRefused(FerryError):
    """the configuration server refused {call}: {message} (HTTP {status})"""

    exit_code = Exit.REFUSED

    @property
    def status(self) -> int:
        """The HTTP status of the refusal."""
        return int(str(self.fields["status"]))


class ControlUnavailable(RetryableError):
    """the configuration server at {server} is unavailable: {problem}"""


class ControlUntrusted(ControlUnavailable):
    """TLS to the configuration server {server} failed ({problem}); check the CA (--ca, FERRY_CA)"""

    exit_code = Exit.UNTRUSTED
    # Still retryable: a daemon keeps trying (the server's certificate may be
    # replaced); the CLI exits with its own code so the operator fixes the CA.


class CommandFailed(FerryError):
    """{detail}"""

    exit_code = Exit.COMMAND_FAILED


class CredentialsInvalid(FerryError):
    """credentials file {path}: {problem}"""

    exit_code = Exit.USAGE
