"""`mesh api`: an OpenAI-compatible HTTP API (and the live dashboard) for a model served by the swarm."""

from __future__ import annotations

import signal
from functools import partial
from pathlib import Path

import typer

from .common import (device_option, dtype_option, initial_peers_option, speculate_option, swarm_key_option,
                     verify_option)
from .output import one_line_errors, setup_logging, stderr, write

__all__ = ["api"]


@one_line_errors
def api(
    model: str = typer.Argument("smollm2", help="Model name (e.g. smollm2, llama-2-70b), hub id, folder or .gguf."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. The default keeps the API to this "
                             "machine; 0.0.0.0 opens it to the network (then set --api-key)."),
    api_key: str = typer.Option(None, "--api-key", envvar="MESH_API_KEY", help="Require `Authorization: Bearer "
                                "KEY` on /v1 requests (also read from $MESH_API_KEY)."),
    max_concurrent: int = typer.Option(16, "--max-concurrent", min=1, help="Requests answered at once; more get "
                                       "HTTP 429."),
    initial_peers: list[str] = initial_peers_option(),
    swarm_key: Path = swarm_key_option(),
    verify: float = verify_option(),
    device: str = device_option(),
    dtype: str = dtype_option(),
    compression: str = typer.Option("none", help="Hidden states on the wire: none, float16, bfloat16, int8."),
    exact: bool = typer.Option(False, "--exact", help="Use only float32, unquantized servers (reproducible)."),
    speculate: str = speculate_option(),
    timeout: float = typer.Option(30.0, min=1.0, help="Seconds to wait for servers of every block at start."),
    verbose: int = typer.Option(1, "--verbose", "-v", count=True, help="-v: one line per request; -vv: details."),
) -> None:
    """Serve /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API) through the swarm, with the
    swarm's live dashboard at /. Point any OpenAI client at http://HOST:PORT/v1."""
    from .. import DistributedModelForCausalLM
    from ..web.app import serve_api

    setup_logging(verbose)
    with stderr().status(f"joining the swarm for {model}"):
        lm = DistributedModelForCausalLM.from_pretrained(model, initial_peers, device=device, dtype=dtype,
                                                         compression=compression, exact=exact, swarm_key=swarm_key,
                                                         verify=verify, timeout=timeout)
    names = {model, lm.source.name, lm.source.model_id}

    def ready(url: str) -> None:
        write(f"mesh api: {url}/v1 (dashboard: {url}/)\n")

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        lm.use_speculation(speculate)
        lm.client.call(partial(serve_api, lm, names, host, port, api_key=api_key, max_concurrent=max_concurrent,
                               on_ready=ready))
    except KeyboardInterrupt:
        pass
    finally:
        lm.close()
