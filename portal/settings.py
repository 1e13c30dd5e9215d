"""The portal's settings: where the configuration server is, and how operators sign in.

- ``server`` (``FERRY_SERVER``): the configuration server's URL.
- ``ca`` (``FERRY_CA``): CA file to trust for it (default: the system's).
- ``install_server`` (``FERRY_PORTAL_INSTALL_SERVER``): the server URL hosts use, shown in
  install commands (default ``server``); ``install_ca`` (``FERRY_PORTAL_INSTALL_CA``): the
  CA path hosts use.
- ``entra`` (``FERRY_PORTAL_ENTRA=1``): trust App Service authentication's
  ``X-MS-CLIENT-PRINCIPAL`` header.  Only behind App Service authentication,
  which strips the header from clients' requests; local sign-in is then off.
- ``principals`` (``FERRY_PORTAL_PRINCIPALS``): with Entra, a JSON file
  ``{"<principal name or object id>": ["<tenant>", ...]}``.
- ``tenant_tokens`` (``FERRY_PORTAL_TOKEN_<TENANT>``, dashes as underscores): with
  Entra, each tenant's operator token (a Key Vault reference in Azure).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ferry.errors import ConfigError


@dataclass
class Settings:
    """Everything the portal needs to run."""

    server: str
    ca: str | None = None
    install_server: str | None = None
    install_ca: str | None = None
    entra: bool = False
    principals: dict[str, list[str]] = field(default_factory=dict)
    tenant_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def verify(self) -> str | bool:
        """What requests verifies the server's certificate with."""
        return self.ca or True


def from_environment(server: str | None = None, ca: str | None = None) -> Settings:
    """Settings from the environment (arguments win); ConfigError naming what is wrong."""
    server = server or os.environ.get("FERRY_SERVER")
    if not server:
        raise ConfigError(
            path="the environment", problem="no configuration server: pass --server or FERRY_SERVER"
        )
    settings = Settings(
        server=server,
        ca=ca or os.environ.get("FERRY_CA") or None,
        install_server=os.environ.get("FERRY_PORTAL_INSTALL_SERVER") or None,
        install_ca=os.environ.get("FERRY_PORTAL_INSTALL_CA") or None,
        entra=os.environ.get("FERRY_PORTAL_ENTRA") == "1",
    )
    if settings.entra:
        settings.principals = _principals(os.environ.get("FERRY_PORTAL_PRINCIPALS"))
        settings.tenant_tokens = {
            name[len("FERRY_PORTAL_TOKEN_") :].lower().replace("_", "-"): value
            for name, value in os.environ.items()
            if name.startswith("FERRY_PORTAL_TOKEN_") and value
        }
    return settings


def _principals(path: str | None) -> dict[str, list[str]]:
    if not path:
        raise ConfigError(
            path="the environment", problem="FERRY_PORTAL_ENTRA=1 needs FERRY_PORTAL_PRINCIPALS"
        )
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(path=path, problem=str(exc))
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in raw.values()
    ):
        raise ConfigError(path=path, problem="it must map each principal to a list of tenant ids")
    return raw
