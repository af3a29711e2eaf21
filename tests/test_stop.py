"""StopRequest: the first SIGTERM/SIGINT becomes a request the loop polls; the second acts at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from hf_r1ewc.stop import StopRequest


def _deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


def test_first_signal_is_a_request_the_second_acts_at_once():
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever a library set before
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopRequest() as stop:
                _deliver(signal.SIGTERM)
                assert stop.signal_name == "SIGTERM"  # the process is still here
                _deliver(signal.SIGINT)  # the second: the handler from before the block again, which raises
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_handlers_are_restored_when_the_block_ends():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopRequest() as stop:
        assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    assert stop.signal_name is None
    assert {s: signal.getsignal(s) for s in before} == before
