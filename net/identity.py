"""A node's identity: an Ed25519 key kept on disk, so a server's peer id survives restarts.

Two processes under one peer id shadow each other: the swarm keeps one table entry for both, and the
second's announcements overwrite the first's span, so blocks look missing forever. A key file is therefore
locked for as long as a process uses it. A server on the default identity that finds it taken moves on to
the next default slot (`identity-2.key`, …), so several servers started on one machine with default options
each get a peer id of their own, stable across restarts; an identity named explicitly is never swapped.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair

from ..model.errors import MeshError

__all__ = ["Identity", "IdentityInUse", "default_identity_path", "open_identity"]

DEFAULT_SLOTS = 16  # default identities one machine can run at once


class IdentityInUse(MeshError):
    """Another running process holds this identity file: two nodes must not share a peer id."""

    code = "identity_in_use"


@dataclass
class Identity:
    """The key pair a node runs under, and the lock that keeps it this process's alone."""

    key_pair: KeyPair
    path: Path | None = None  # None: fresh for this run only
    _lock: IO | None = None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None


def default_identity_path() -> Path:
    """The key file a server uses without --identity ($MESH_HOME or ~/.config/mesh)."""
    home = Path(os.environ.get("MESH_HOME", Path.home() / ".config" / "mesh"))
    return home / "identity.key"


def open_identity(path: Path | None, *, fallback: bool = False) -> Identity:
    """The identity kept in `path` (created 0600 on first use) and locked for this process; with
    `fallback`, the next free default slot when `path` is held by another process."""
    if path is None:
        return Identity(_new_key())
    path = Path(path).expanduser()
    slots = [path] + ([path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(2, DEFAULT_SLOTS + 1)]
                      if fallback else [])
    holders = []
    for slot in slots:
        lock = _try_lock(slot)
        if lock is None:
            holders.append(_holder(slot))
            continue
        try:
            return Identity(_load_or_create(slot), slot, lock)
        except BaseException:
            lock.close()
            raise
    raise IdentityInUse(f"the identity {path} is in use by another mesh process here ({holders[0]})"
                        + (f", and so are the other {len(slots) - 1} default identities" if fallback else ""),
                        hint="pass --new-identity for a fresh peer id, or --identity FILE")


def _new_key() -> KeyPair:
    key = Ed25519PrivateKey.new(secrets.token_bytes(32))
    return KeyPair(key, key.get_public_key())


def _load_or_create(path: Path) -> KeyPair:
    if path.exists():
        try:
            key = Ed25519PrivateKey.from_bytes(path.read_bytes())
        except Exception as e:
            raise MeshError(f"cannot read the identity key {path}: {e}".splitlines()[0],
                            hint="delete it to create a new identity (the peer id changes)") from e
        return KeyPair(key, key.get_public_key())
    pair = _new_key()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pair.private_key.to_bytes())
    os.replace(tmp, path)
    return pair


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _try_lock(path: Path) -> IO | None:
    """An exclusive, non-blocking lock beside the key file, or None if another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no protection, as before
        return open(_lock_path(path), "a")
    handle = open(_lock_path(path), "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _holder(path: Path) -> str:
    try:
        pid = _lock_path(path).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "a running process"
