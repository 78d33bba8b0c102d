"""HTTP in the node's own event loop: the OpenAI-compatible API and the live swarm dashboard.

An ASGI app (Starlette, on anyio) served by Hypercorn's trio worker inside the trio run that already holds
the libp2p node, so requests reach the swarm without a second event loop or a thread per request.
"""
