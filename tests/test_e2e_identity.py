"""Several `mesh serve` with default options on one machine: each gets its own peer id and port.

They run in a network namespace of the test's own with only loopback in it, so the default listen address
(0.0.0.0:31337) is truly the default and nothing they announce leads outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from procs import MESH, MeshProcess

pytestmark = [pytest.mark.e2e, pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")]


@pytest.fixture
def netns():
    name = f"mlid{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def default_serve(folder, blocks: str, log, netns: str, *extra: str) -> MeshProcess:
    return MeshProcess(["serve", str(folder), "--blocks", blocks, "--threads", "1", *extra], log,
                       env={"HF_HUB_OFFLINE": "1"}, netns=netns)


def test_three_default_servers_on_one_machine_cover_the_model(tiny30, tmp_path, netns):
    procs: list[MeshProcess] = []
    try:
        first = default_serve(tiny30, "0:10", tmp_path / "s0.log", netns)
        procs.append(first)
        boot = first.wait_ready_sync(60)
        assert "/tcp/31337/" in boot
        procs += [default_serve(tiny30, span, tmp_path / f"s{i}.log", netns, "--initial-peers", boot)
                  for i, span in ((1, "10:20"), (2, "20:30"))]
        for p in procs[1:]:
            p.wait_ready_sync(60)
        assert len({p.peer_id for p in procs}) == 3, [p.addr for p in procs]
        assert len({p.addr.split("/p2p/")[0] for p in procs}) == 3
        for p in procs[1:]:
            assert "identity.key is in use by another mesh process here; running as" in p.output()

        status = subprocess.run(["ip", "netns", "exec", netns, *MESH, "status", "--json", "--initial-peers", boot],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        (model,) = json.loads(status.stdout)["models"]
        assert model["servers_per_block"] == [1] * 30

        # named explicitly, a key or a port in use is refused at once with a one-line error
        home = os.environ["MESH_HOME"]
        serve = ["ip", "netns", "exec", netns, *MESH, "serve", str(tiny30), "--blocks", "0:1"]
        both = [subprocess.Popen(serve + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for extra in (["--identity", f"{home}/identity.key", "--listen", "/ip4/127.0.0.1/tcp/0"],
                              ["--new-identity", "--listen", "/ip4/0.0.0.0/tcp/31337"])]
        (key_code, key_err), (port_code, port_err) = [(p.wait(60), p.communicate()[1]) for p in both]
        assert key_code == 2 and "in use by another mesh process" in key_err
        assert "--new-identity" in key_err and "Traceback" not in key_err
        assert port_code == 2 and "the port is in use" in port_err, port_err
    finally:
        for p in procs:
            p.cleanup()
