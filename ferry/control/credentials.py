"""A component's credentials file: what it needs to call the configuration server as itself."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ferry import naming
from ferry.control.errors import CredentialsInvalid
from ferry.durable import fsync_dir

# -- credentials ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a component needs to call the configuration server as itself."""

    server: str
    tenant: str
    component_id: str
    token: str = dataclasses.field(repr=False)
    ca: str | None = None

    @property
    def kind(self) -> str | None:
        """The component's kind, from its id's prefix."""
        return naming.component_kind(self.component_id)

    @property
    def name(self) -> str:
        """The component's name (for an agent: its machine id)."""
        return self.component_id.split("-", 1)[1] if "-" in self.component_id else ""

    @property
    def command_queue(self) -> str:
        """The queue on which this component receives its commands."""
        return naming.command_queue(self.tenant, self.component_id)

    def as_json(self) -> dict[str, Any]:
        """The credentials file's content."""
        out = {
            "server": self.server,
            "tenant": self.tenant,
            "component_id": self.component_id,
            "token": self.token,
        }
        if self.ca:
            out["ca"] = self.ca
        return out

    def save(self, path: str | Path) -> None:
        """Write the credentials file (mode 0600, atomically, fsync'ed)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        data = json.dumps(self.as_json(), indent=1, sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask or a leftover file said
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @classmethod
    def load(cls, path: str | Path) -> Credentials:
        """Read a credentials file; CredentialsInvalid (never showing the token) if unusable."""
        path = Path(path)
        raw = _read_private(path)
        problem = _credentials_problem(raw)
        if problem:
            raise CredentialsInvalid(path=path, problem=problem)
        ca = raw.get("ca") or None
        if ca is not None and not os.access(ca, os.R_OK):
            raise CredentialsInvalid(path=path, problem=f"cannot read the CA file {ca}")
        return cls(raw["server"].rstrip("/"), raw["tenant"], raw["component_id"], raw["token"], ca)


def _read_private(path: Path) -> Any:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise CredentialsInvalid(path=path, problem="file not found (register first)")
    except OSError as exc:
        raise CredentialsInvalid(path=path, problem=exc.strerror or str(exc))
    if mode & 0o077:
        raise CredentialsInvalid(
            path=path,
            problem=f"its group or other users may access it (mode {mode & 0o777:04o}); chmod 600 it",
        )
    try:
        return json.loads(text)
    except ValueError:
        raise CredentialsInvalid(path=path, problem="not valid JSON")


def _credentials_problem(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return "must hold a JSON object"
    for key in ("server", "tenant", "component_id", "token"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            return f"missing or empty {key}"
    if not raw["server"].startswith(("http://", "https://")):
        return "server must be an http:// or https:// URL"
    if raw.get("ca") is not None and not isinstance(raw["ca"], str):
        return "ca must be a file name"
    return naming.check_id("tenant", raw["tenant"]) or naming.check_id(
        "component_id", raw["component_id"]
    )
