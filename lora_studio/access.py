"""Who may reach a server: the loopback rule and secrets read from a file or the environment.

    require_auth_beyond_loopback("0.0.0.0", has_auth=False, insecure=False, ...)  # a ConfigError
    key = read_secret(args.api_key, args.api_key_file, "LORA_STUDIO_API_KEY", "--api-key")

The API server and the web UI bind 127.0.0.1 by default. Binding any other address without a key
or password is refused unless the operator says `--insecure-no-auth`. Secrets can come from a
file or an environment variable, because a command line is visible to every user in `ps`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name or an interface: assume others can reach it
        return False


def require_auth_beyond_loopback(
    host: str, *, has_auth: bool, insecure: bool, what: str, secret: str, how: str
) -> None:
    """Refuse to serve `what` on a non-loopback `host` without its `secret`, unless `insecure`."""
    if is_loopback(host) or has_auth:
        return
    if not insecure:
        raise ConfigError(
            f"--host {host} lets other machines reach {what}, and no {secret} is set: give {how}, "
            "or --insecure-no-auth to let anyone who can connect use it"
        )
    log.warning("serving %s on %s without authentication (--insecure-no-auth)", what, host)


def read_secret(given: str | None, file: str | None, env_var: str, option: str) -> str | None:
    """A key or password from `option` (argv), `option`-file, or `env_var`, in that order; None if none."""
    if given is not None and file is not None:
        raise ConfigError(f"{option} and {option}-file are both given; use one of them")
    if file is not None:
        try:
            text = Path(file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{option}-file {file}: cannot read it ({e}); give a readable text file"
            ) from None
        if not text or "\n" in text:
            raise ConfigError(f"{option}-file {file}: expected exactly one non-empty line, the secret itself")
        return text
    if given is not None:
        log.warning(
            "%s on the command line is visible to other users (ps); prefer %s-file or $%s",
            option,
            option,
            env_var,
        )
        return given or None
    return os.environ.get(env_var) or None
