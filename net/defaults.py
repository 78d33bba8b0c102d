"""A server's defaults, written once for `ServerConfig` and for `mesh serve`'s options.

A module of its own because the CLI builds `mesh serve --help` from it without loading torch or libp2p.
"""

from __future__ import annotations

__all__ = ["BLOCKS", "QUANT", "JOIN_DELAY", "BALANCE_PERIOD", "CACHE_TOKENS", "MAX_LENGTH", "ANNOUNCE_PERIOD",
           "IDLE_TIMEOUT"]

BLOCKS = "auto"  # "START:END" or "auto"
QUANT = "auto"  # "none", "int8", "nf4" or "auto" (nf4 on CUDA when the blocks would not fit, else none)
JOIN_DELAY = 2.5  # with --blocks auto: wait U(0, 2 × this) s before choosing, so joiners spread
BALANCE_PERIOD = 60.0  # with --blocks auto: mean s between rebalancing checks (0: never move)
CACHE_TOKENS = 32768  # sum of max_length × batch over open sessions
MAX_LENGTH = 4096  # longest session a client may open
ANNOUNCE_PERIOD = 5.0  # s between announcements
IDLE_TIMEOUT = 300.0  # a session silent this long is closed and its cache freed
