"""A second Ctrl-C during a checkpoint write waits for the write, in a process with other threads.

The CI failure this guards: torch and gloo run threads that do not block SIGINT, so the kernel
delivered the second Ctrl-C to one of them while the main thread had it masked; Python then ran
the handler in the main thread mid-write (dist_checkpointing was starting its writer process,
which died with a traceback on the run's stderr).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from gazal_nemo.training import preemption


@pytest.fixture()
def handlers():
    preemption.install_stop_handlers()
    yield
    preemption.restore_default_handlers()


def _thread_without_the_mask(done: threading.Event) -> threading.Thread:
    """Started before the mask, as torch's threads are, so SIGINT is not blocked there."""
    thread = threading.Thread(target=done.wait, args=(10,), daemon=True)
    thread.start()
    return thread


def _python_work(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # bytecode boundaries, where Python runs pending handlers
        sum(range(100))


def test_second_ctrl_c_during_a_write_is_raised_after_it(handlers):
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: recorded, a checkpoint is wanted
    assert preemption.stop_requested_locally()
    done = threading.Event()
    thread = _thread_without_the_mask(done)
    write_finished = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with preemption.stop_signals_deferred():
                signal.pthread_kill(thread.ident, signal.SIGINT)  # where the kernel may hand it
                _python_work(0.3)
                write_finished = True
    finally:
        done.set()
        thread.join(10)
    assert write_finished, "the second Ctrl-C cut the checkpoint write short"


def test_second_ctrl_c_outside_a_write_exits_at_once(handlers):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        _python_work(1.0)


def test_a_write_without_a_second_ctrl_c_ends_normally(handlers):
    os.kill(os.getpid(), signal.SIGINT)
    with preemption.stop_signals_deferred():
        _python_work(0.05)
    assert preemption.stop_requested_locally()
