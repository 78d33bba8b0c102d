"""Logging goes through one configuration, including libp2p's own logger (which does not propagate)."""

from __future__ import annotations

import logging

from mesh.cli.output import setup_logging


def test_libp2p_errors_reach_our_handler_and_routine_noise_does_not(capsys):
    import libp2p  # noqa: F401  (its import sets propagate=False on the "libp2p" logger)

    logging.getLogger("some.module").warning("x")  # a stray root-logger call would add a handler
    setup_logging(1)
    root = logging.getLogger()
    assert len(root.handlers) == 1
    logging.getLogger("libp2p.network").warning("routine libp2p noise")
    logging.getLogger("libp2p.network").error("a real libp2p failure")
    logging.getLogger("mesh.server").info("serving")
    err = capsys.readouterr().err
    assert "a real libp2p failure" in err and "serving" in err
    assert "routine libp2p noise" not in err
