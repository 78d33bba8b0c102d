"""Allow-lists: a server that serves, relays and gossips only with the peers a file names.

A swarm key keeps outsiders from connecting at all; an allow-list picks members by identity, within an
open or a private swarm. A stranger that connects gets a typed refusal (`not_allowed`) on its first mesh
request, then its connection is closed; connections that carry no mesh request (gossip, DHT, relay) are
closed after GRACE seconds, and nothing a stranger announces enters the server's table meanwhile.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.peer.id import ID

from ..model.errors import BadRequest
from .wire import short_id

__all__ = ["read_allow_list", "StrangerGate", "GRACE"]

log = logging.getLogger("mesh.node")

GRACE = 1.0  # s a stranger's connection stays open: long enough to read its typed refusal
MAX_PEERS = 100_000


def read_allow_list(path: Path) -> frozenset[str]:
    """Peer ids from a file: one per line; blank lines and `#` comments ignored; a bad line is an error."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest(f"cannot read the allow-list {path}: {e}") from None
    peers: set[str] = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ID.from_base58(text)
        except Exception:
            raise BadRequest(f"{path}:{number}: {text[:60]!r} is not a peer id",
                             hint="one peer id (12D3Koo…, as `mesh status` shows them) per line") from None
        peers.add(text)
    if len(peers) > MAX_PEERS:
        raise BadRequest(f"{path}: more than {MAX_PEERS} peers")
    return frozenset(peers)


class StrangerGate(INotifee):
    """Closes every connection of a peer off the list GRACE seconds after it opens."""

    def __init__(self, host, allowed: frozenset[str], nursery: trio.Nursery) -> None:
        self.host, self.allowed, self.nursery = host, allowed, nursery

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if peer.to_base58() not in self.allowed:
            self.nursery.start_soon(self._close_later, peer)

    async def _close_later(self, peer: ID) -> None:
        await trio.sleep(GRACE)
        log.info("closing the connection of %s: not on the allow-list", short_id(peer.to_base58()))
        try:
            await self.host.disconnect(peer)
        except Exception as e:  # already gone
            log.debug("disconnect %s: %s", short_id(peer.to_base58()), e)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr) -> None:
        pass
