"""Calls made while a real process is stopped (SIGSTOP), for deadline tests."""
from __future__ import annotations

import os
import signal
import time

import pytest

import shoal


def errors_while_stopped(pid: int, *calls) -> list[tuple[shoal.ShoalError, float]]:
    """Stop ``pid``, make each call (each must fail with a ShoalError), resume ``pid``:
    [(the error, seconds the call took)] in call order. The process goes on even if a
    call does not fail."""
    out = []
    os.kill(pid, signal.SIGSTOP)
    try:
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(shoal.ShoalError) as e:
                call()
            out.append((e.value, time.monotonic() - t0))
    finally:
        os.kill(pid, signal.SIGCONT)
    return out
