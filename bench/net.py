"""Round-trip time and throughput of mesh's wire layer over libp2p, next to the same frames over raw TCP.

One run starts two echo servers in separate processes (libp2p: TCP + Noise + Yamux through mesh's node;
raw: trio TCP) and measures, from this process, tensors of 2 KB and 4 MB encoded by net/codec.py and
framed by net/wire.py. Also prints codec encode+decode times.

    .venv/bin/python bench/net.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import trio

from mesh.net import wire
from mesh.net.codec import COMPRESSIONS, decode_tensor, encode_tensor

SIZES = {"2 KB": (1, 1, 512), "4 MB": (1, 1024, 1024)}  # float32 elements


async def echo(stream) -> None:
    while True:
        try:
            frame = await wire.read_frame(stream, timeout=120)
        except wire.StreamClosed:
            return
        await wire.write_frame(stream, frame)


async def serve_tcp() -> None:
    async def handler(s):
        await echo(wire.TrioByteStream(s))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(f"tcp {listeners[0].socket.getsockname()[1]}", flush=True)
    await trio.serve_listeners(handler, listeners)


async def serve_libp2p() -> None:
    from mesh.net.node import NodeConfig, open_node

    async with open_node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"])) as node:
        node.set_handler("bench-echo", echo)
        print(f"libp2p {node.addrs[0]}", flush=True)
        await trio.sleep_forever()


async def measure(stream, shape, rounds: int) -> tuple[float, float, float]:
    frame = {"t": encode_tensor(torch.randn(shape))}
    size = len(wire.pack(frame))
    for _ in range(3):
        await wire.write_frame(stream, frame)
        await wire.read_frame(stream, timeout=60)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await wire.write_frame(stream, frame)
        back = await wire.read_frame(stream, timeout=60)
        times.append(time.perf_counter() - t0)
    decode_tensor(back["t"])
    times.sort()
    med = statistics.median(times)
    return med, times[int(0.9 * (len(times) - 1))], 2 * size / med / 1e6


def start(mode: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    return proc, line[1]


async def client(rounds: int, tcp_port: str, libp2p_addr: str) -> dict:
    from mesh.net.node import NodeConfig, open_node

    results = {}
    async with open_node(NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"])) as node:
        peer = await node.connect(libp2p_addr)
        async with node.stream(peer, "bench-echo") as s:
            for name, shape in SIZES.items():
                results[("libp2p", name)] = await measure(s, shape, rounds if name == "2 KB" else max(10, rounds // 10))
    sock = await trio.open_tcp_stream("127.0.0.1", int(tcp_port))
    async with sock:
        for name, shape in SIZES.items():
            results[("tcp", name)] = await measure(wire.TrioByteStream(sock), shape, rounds if name == "2 KB" else max(10, rounds // 10))
    return results


def codec_times() -> list[tuple[str, str, float, float]]:
    out = []
    for label, shape in (("1x1x576", (1, 1, 576)), ("4x128x576", (4, 128, 576))):
        x = torch.randn(shape)
        x[..., 7] = 25000
        for name in COMPRESSIONS:
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                d = encode_tensor(x, name)
            enc = (time.perf_counter() - t0) / n
            t0 = time.perf_counter()
            for _ in range(n):
                decode_tensor(d)
            dec = (time.perf_counter() - t0) / n
            out.append((label, name, enc * 1e3, dec * 1e3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=["tcp", "libp2p"])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if args.serve == "tcp":
        return trio.run(serve_tcp)
    if args.serve == "libp2p":
        return trio.run(serve_libp2p)
    procs = []
    try:
        tcp, tcp_port = start("tcp")
        lp, lp_addr = start("libp2p")
        procs = [tcp, lp]
        results = trio.run(client, args.rounds, tcp_port, lp_addr)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    print("\nwire layer round trips (echo, separate processes, loopback)")
    print(f"{'tensor':8} {'path':8} {'median ms':>10} {'p90 ms':>8} {'MB/s':>8}")
    for name in SIZES:
        for path in ("libp2p", "tcp"):
            med, p90, mbps = results[(path, name)]
            print(f"{name:8} {path:8} {med * 1e3:10.3f} {p90 * 1e3:8.3f} {mbps:8.1f}")
        ratio = results[("libp2p", name)][0] / results[("tcp", name)][0]
        print(f"{name:8} libp2p/tcp round-trip ratio: {ratio:.1f}x")
    print("\ncodec encode / decode (ms)")
    for label, name, enc, dec in codec_times():
        print(f"{label:10} {name:9} {enc:7.3f} {dec:7.3f}")


if __name__ == "__main__":
    main()
