"""Passwords of a deployment: taken from the environment or generated, kept in mode-600 files.

A password never goes on a command line (``/proc/PID/cmdline`` is readable by every local
user). ``role_passwords`` returns, for every role, ``$CONVEYOR_<ROLE>_PASSWORD`` when it is
set, else the one in ``<dir>/<role>.password`` from an earlier run, else a new random one,
and writes what it chose to that file (mode 600, the directory mode 700), so that
regenerating a deployment keeps the passwords a running broker already has.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from conveyor.errors import ConfigError

#: Bytes of randomness in a generated password (URL-safe base64: no quoting needed in URLs).
PASSWORD_BYTES = 24


def password_env(role: str) -> str:
    """The environment variable that may give ``role``'s password."""
    return f"CONVEYOR_{role.upper()}_PASSWORD"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (mode 600 from the start: the
    file is never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _check_password(role: str, value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{where} gives an empty password for {role}; set one or unset it")
    if any(c.isspace() or c in "@:/%#?" for c in value):
        # it goes into an amqp:// URL: characters that would need quoting are refused
        raise ConfigError(
            f"{where}: the {role} password contains whitespace or one of @:/%#?; "
            "use letters, digits, '-', '_' and '.'"
        )
    return value


def role_passwords(
    directory: Path, roles: Iterable[str], env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """role -> password (environment, existing file, or new), each written to
    ``directory/<role>.password`` with mode 600."""
    env = os.environ if env is None else env
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(stat.S_IRWXU)
    out: dict[str, str] = {}
    for role in roles:
        file = directory / f"{role}.password"
        var = password_env(role)
        if env.get(var):
            value = _check_password(role, env[var], f"${var}")
        elif file.exists():
            value = _check_password(role, file.read_text(), str(file))
        else:
            value = secrets.token_urlsafe(PASSWORD_BYTES)
        write_private(file, value + "\n")
        out[role] = value
    return out
