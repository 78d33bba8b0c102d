"""Private swarms: a 32-byte pre-shared key every member holds, checked before any protocol is spoken.

libp2p's private-network protector (PSK) encrypts each raw connection with the key (XSalsa20, a nonce per
direction) before the security handshake, so a node without the key, or with another one, cannot complete
any connection: not gossip, not the DHT, not a relay. The file format is go-libp2p's `swarm.key`
(`/key/swarm/psk/1.0.0/`, `/base16/`, then 64 hex digits), so a key can be shared with other libp2p
tools. A key file is written readable by its owner only; what it protects is membership, not secrecy
between members.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..model.errors import BadRequest

__all__ = ["ENV_SWARM_KEY", "write_swarm_key", "read_swarm_key", "swarm_key_from"]

ENV_SWARM_KEY = "MESH_SWARM_KEY"  # a key file's path, for every command that joins a swarm
HEADER = ("/key/swarm/psk/1.0.0/", "/base16/")
MAX_FILE = 4096


def write_swarm_key(path: Path) -> str:
    """A new random key in a new file at `path` (never overwriting one); returns its hex digits."""
    key = secrets.token_hex(32)
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise BadRequest(f"{path} exists", hint="a swarm's key is changed by giving every member a new file; "
                         "choose another path") from None
    except OSError as e:
        raise BadRequest(f"cannot write {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write("\n".join((*HEADER, key)) + "\n")
    return key


def read_swarm_key(path: Path) -> str:
    """The key's 64 hex digits from a key file (go-libp2p's format, or the digits alone)."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        raise BadRequest(f"cannot read the swarm key {path}: {e.strerror}") from None
    try:
        lines = [line.strip() for line in raw.decode("ascii").splitlines() if line.strip()]
    except UnicodeDecodeError:
        lines = []
    if len(raw) > MAX_FILE or not lines:
        raise BadRequest(f"{path} is not a swarm key", hint="make one with `mesh keygen --swarm-key FILE`")
    if lines[:2] == list(HEADER):
        lines = lines[2:]
    elif lines[0].startswith("/key/swarm/"):
        raise BadRequest(f"{path}: only base16 swarm keys are read", hint=f"expected {' '.join(HEADER)}")
    key = lines[0].lower() if len(lines) == 1 else ""
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise BadRequest(f"{path}: a swarm key is 64 hex digits", hint="make one with `mesh keygen --swarm-key FILE`")
    return key


def swarm_key_from(path: Path | str | None) -> str | None:
    """The key of `path`, else of the file $MESH_SWARM_KEY names, else None (the open swarm)."""
    chosen = path if path else os.environ.get(ENV_SWARM_KEY) or None
    return read_swarm_key(Path(chosen)) if chosen else None
