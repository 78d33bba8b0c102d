"""Logging goes through one configuration, including libp2p's own logger (which does not propagate)."""

from __future__ import annotations

import logging

from mesh.cli.output import setup_logging


def test_libp2p_errors_reach_our_handler_and_routine_noise_does_not(capsys):
    import libp2p  # noqa: F401  (its import sets propagate=False on the "libp2p" logger)

    logging.getLogger("some.module").warning("x")  # a stray root-logger call would add a handler
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(1)
        assert len(root.handlers) == 1
        logging.getLogger("libp2p.network").warning("routine libp2p noise")
        logging.getLogger("libp2p.network").error("a real libp2p failure")
        logging.getLogger("mesh.server").info("serving")
        err = capsys.readouterr().err
    finally:  # the handler writes to this test's captured stderr: later tests must not log into it
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "a real libp2p failure" in err and "serving" in err
    assert "routine libp2p noise" not in err
