"""Stop at a step boundary on SIGUSR1 / SIGTERM / a first Ctrl-C, with a checkpoint, and ask to be requeued.

Slurm warns a job before its time limit (`--signal=B:USR1@N`, which our batch scripts
forward to the ranks) and sends SIGTERM on preemption or `scancel`, KillWait seconds
before SIGKILL. Dying there loses every step since the last periodic checkpoint, so:

  * the handler only records the signal: the step in flight (its collectives, its
    optimizer update) finishes untouched;
  * after each step the ranks agree with one all-reduce of the flag, so one rank having
    seen the signal is enough and no rank leaves a collective the others are still in;
  * the loop then saves (atomic, as every checkpoint) and the process exits with
    REQUEUE_EXIT_CODE, which slurm/common.sh turns into `scontrol requeue`; the requeued
    job resumes from that checkpoint.

A first Ctrl-C (SIGINT) is taken the same way, so an interactive run keeps the steps since its
last checkpoint; a second Ctrl-C exits at once (KeyboardInterrupt: `gazal: error: interrupted`,
exit 130, no checkpoint). During a checkpoint write all three signals wait until the write is
done (`stop_signals_deferred`), so a second Ctrl-C then exits right after it.

Handlers are process-wide (signals are), installed once by the stage command before the
model is built, so a signal that arrives while loading is not lost either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import torch
import torch.distributed as dist

from gazal_nemo.parallel import collective_device

REQUEUE_EXIT_CODE = 75
"""EX_TEMPFAIL ("try again later"): stopped on a signal with a checkpoint; resubmit or requeue."""
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

_received: list[int] = []  # signal numbers seen by this process, in order
_previous: dict[int, object] = {}
_deferred = {"active": False, "interrupt": False}  # inside stop_signals_deferred; a second Ctrl-C came


def _record(signum, _frame) -> None:
    if signum == signal.SIGINT and signal.SIGINT in _received:
        if _deferred["active"]:
            _deferred["interrupt"] = True  # raised when the checkpoint write is done
            return
        raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
    if not _received:
        # os.write, not print: a handler may run inside a print of the main thread.
        again = " (Ctrl-C again to exit now, without a checkpoint)" if signum == signal.SIGINT else ""
        os.write(2, f"gazal: got {signal.Signals(signum).name}; stopping after the current step, with a "
                    f"checkpoint{again}\n".encode())
    _received.append(signum)


def install_stop_handlers() -> None:
    """Record SIGUSR1/SIGTERM/SIGINT instead of dying (main thread only; idempotent)."""
    for signum in STOP_SIGNALS:
        if signum not in _previous:
            _previous[signum] = signal.signal(signum, _record)


def restore_default_handlers() -> None:
    """Put back the handlers that were there before (tests, and the end of a stage)."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()
    _received.clear()
    _deferred["interrupt"] = False


def stop_requested_locally() -> bool:
    return bool(_received)


def agreed_stop_signal() -> str | None:
    """Collective over all ranks: the name of a stop signal any rank received, else None.

    Every rank must call it at the same point of the step loop (it is an all-reduce).
    """
    local = float(_received[0]) if _received else 0.0
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return signal.Signals(int(local)).name if local else None
    flag = torch.tensor([local], dtype=torch.float64, device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return signal.Signals(value).name if value else None


@contextlib.contextmanager
def stop_signals_deferred():
    """Hold SIGUSR1/SIGTERM/SIGINT until the block ends (a checkpoint write): `scancel --signal`, a
    preemption's TERM and a terminal's Ctrl-C reach every process of the step, including the writer
    processes that dist_checkpointing starts, which would die mid-write. The mask is inherited by those
    children. The mask does not hold this process: the kernel hands a signal to any thread that does not
    block it (torch's and gloo's threads), and Python runs our handler in the main thread anyway, so the
    handler itself waits with a second Ctrl-C until the write is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _deferred["active"] = True
    try:
        yield
    finally:
        _deferred["active"] = False
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if _deferred["interrupt"]:
        _deferred["interrupt"] = False
        raise KeyboardInterrupt
