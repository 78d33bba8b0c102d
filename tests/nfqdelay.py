"""A userspace stand-in for netem: holds each forwarded packet for a per-link delay, then lets it go.

The kernel here has no netem, so the lab's hub namespace sends every forwarded packet to NFQUEUE
(`iptables -A FORWARD -j NFQUEUE --queue-num N --queue-bypass`) and this process, speaking raw
nfnetlink_queue, gives each packet its verdict when its time comes:

    release = max(arrival + delay ± jitter, previous release on the same (src, dst))   # never reorders
    verdict = DROP with probability loss, else ACCEPT

Delay is per hub crossing, so a packet from host A to host B is delayed once: one-way latency of the
link A→B. Bandwidth is left to the kernel (tbf on the veths). Run it under `chrt -f` on a busy machine:
release lateness is then well under a millisecond.

    python tests/nfqdelay.py --queue 0 --delay-ms 25 [--jitter-ms 1] [--loss 0.5] \
        [--rule SRC DST DELAY_MS] ...

Prints "ready" once bound; SIGTERM releases every held packet and exits.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_DROP, NF_ACCEPT = 0, 1
COPY_BYTES = 20  # the IPv4 header: source and destination are all we look at


def _attr(kind: int, payload: bytes) -> bytes:
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def _attrs(data: bytes) -> dict[int, bytes]:
    out, i = {}, 0
    while i + 4 <= len(data):
        size, kind = struct.unpack_from("=HH", data, i)
        if size < 4:
            break
        out[kind & 0x3FFF] = data[i + 4:i + size]
        i += (size + 3) & ~3
    return out


class Rules:
    """One-way delay per (source, destination) address; "*" matches any."""

    def __init__(self, delay_ms: float, jitter_ms: float, loss: float, pairs: list[tuple[str, str, float]]):
        self.delay, self.jitter, self.loss = delay_ms / 1e3, jitter_ms / 1e3, loss / 100
        self.pairs = pairs

    def delay_for(self, src: str, dst: str) -> float:
        base = self.delay
        for s, d, ms in self.pairs:
            if s in ("*", src) and d in ("*", dst):
                base = ms / 1e3
                break
        if self.jitter:
            base = max(0.0, base + random.uniform(-self.jitter, self.jitter))
        return base


def bind(queue: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
    requests = [
        _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)),
        _attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_BYTES, NFQNL_COPY_PACKET)),
        _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536)),
    ]
    for seq, attrs in enumerate(requests, 1):
        sock.send(_message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
        reply = sock.recv(65536)
        kind = struct.unpack_from("=H", reply, 4)[0]
        code = struct.unpack_from("=i", reply, 16)[0] if kind == NLMSG_ERROR else 0
        if code:
            raise OSError(-code, f"nfnetlink_queue config step {seq}: {errno.errorcode.get(-code, code)}")
    return sock


def run(queue: int, rules: Rules) -> dict:
    sock = bind(queue)
    sock.setblocking(False)
    held: list[tuple[float, int, int]] = []  # (release time, packet id, verdict)
    last: dict[tuple[bytes, bytes], float] = {}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    late: list[float] = []
    packets = dropped = 0
    print("ready", flush=True)

    def release(upto: float) -> None:
        out = []
        while held and held[0][0] <= upto:
            due, pid, verdict = heapq.heappop(held)
            late.append(time.monotonic() - due)
            out.append(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, pid))))
        if out:
            sock.send(b"".join(out))

    while not stop:
        now = time.monotonic()
        release(now)
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.5
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if not readable:
            continue
        while True:
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            now = time.monotonic()
            i = 0
            while i + 16 <= len(data):
                size, kind = struct.unpack_from("=IH", data, i)
                if size < 16:
                    break
                if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                    attrs = _attrs(data[i + 20:i + size])
                    pid = struct.unpack("!I", attrs[NFQA_PACKET_HDR][:4])[0]
                    payload = attrs.get(NFQA_PAYLOAD, b"")
                    src, dst = payload[12:16], payload[16:20]
                    packets += 1
                    if rules.loss and random.random() < rules.loss:
                        dropped += 1
                        heapq.heappush(held, (now, pid, NF_DROP))
                    else:
                        due = now + rules.delay_for(socket.inet_ntoa(src), socket.inet_ntoa(dst))
                        due = max(due, last.get((src, dst), 0.0))
                        last[(src, dst)] = due
                        heapq.heappush(held, (due, pid, NF_ACCEPT))
                i += (size + 3) & ~3
    release(float("inf"))
    late.sort()
    return {"packets": packets, "dropped": dropped,
            "late_p50_ms": 1e3 * late[len(late) // 2] if late else 0.0,
            "late_p99_ms": 1e3 * late[int(len(late) * 0.99)] if late else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped")
    p.add_argument("--rule", nargs=3, action="append", default=[], metavar=("SRC", "DST", "DELAY_MS"))
    a = p.parse_args()
    rules = Rules(a.delay_ms, a.jitter_ms, a.loss, [(s, d, float(ms)) for s, d, ms in a.rule])
    stats = run(a.queue, rules)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
