"""The secrets a checkout's `make run` signs with, its own instead of those published with the code:
made once (`secrets.token_urlsafe`), kept in the run's folder (`.run/secrets`, git-ignored, only
its owner may read it) and read again by every later run, so that the tokens users were given
outlive a restart of `make run`. A secret set in the environment is the user's, and wins."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path

from shared.config import SECRETS

# The file, in the run's folder: `NAME=value` lines, as `.run/env` writes them.
SECRETS_FILE = "secrets"
OWNER_ONLY = 0o600
# Bytes of randomness in each secret made: 256 bits, as HMAC-SHA256 keys want (43 characters).
SECRET_BYTES = 32


def secrets_to_hand_out(path: str | os.PathLike,
                        environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The secrets (shared.config.SECRETS) that the processes of a run get from the checkout's
    file at `path`: all but those set in `environ`, which the processes take from it as they
    are."""
    return {name: value for name, value in checkout_secrets(path).items() if name not in environ}


def checkout_secrets(path: str | os.PathLike) -> dict[str, str]:
    """Every secret as kept at `path`, those missing there made and kept first. Where there was
    no file, the one made is kept only if no other run kept one meanwhile (two `make run`s started
    at once in a fresh checkout), and that one is read instead: both hand out the secrets kept."""
    path = Path(path)
    found = _read(path)
    kept = found or {}
    made = {name: secrets.token_urlsafe(SECRET_BYTES) for name in SECRETS if not kept.get(name)}
    if made:
        kept = {name: kept.get(name) or made[name] for name in SECRETS}
        try:
            write_owner_only(path, "".join(f"{name}={value}\n" for name, value in kept.items()),
                             replacing=found is not None)
        except FileExistsError:  # (another run kept its own first)
            return checkout_secrets(path)
    elif path.stat().st_mode & 0o777 != OWNER_ONLY:  # (loosened since: tightened again)
        path.chmod(OWNER_ONLY)
    return {name: kept[name] for name in SECRETS}


def write_owner_only(path: str | os.PathLike, text: str, replacing: bool = True) -> Path:
    """Write `text` to `path`, readable by its owner only (mode 0600) from its first byte on, and
    whole or not at all (written beside it, then renamed over it): a run killed mid-write leaves
    the file as it was, not half of it. Not `replacing`, FileExistsError if there is one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # (0600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        if replacing:
            os.replace(staging, path)
        else:  # (a link is made whole, or not at all where the name is taken)
            os.link(staging, path)
    finally:
        Path(staging).unlink(missing_ok=True)
    return path


def _read(path: Path) -> dict[str, str] | None:
    """The `NAME=value` lines of the file at `path` (None if there is no file)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
