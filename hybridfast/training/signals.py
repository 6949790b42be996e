"""SIGINT / SIGTERM during training: finish the step, save a checkpoint, stop cleanly.

Inside `graceful_stop()` the first SIGINT (Ctrl-C) or SIGTERM (what schedulers send before
a kill) only sets a flag; the loop checks it after every optimizer step, writes a
checkpoint at that step and raises `Interrupted`, which unwinds through the folder lock
(released) to the command line (one line, exit 128 + signal: 130 / 143). A second signal
gets the default behaviour back, so a run stuck in a long save can still be stopped.

Handlers can only be installed from the main thread; elsewhere (a training started from
a worker thread) the signals keep their usual meaning.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped by a signal; `step` is the last step taken, `checkpoint` the folder
    saved at it (None when nothing could be saved, e.g. before the first step)."""

    def __init__(self, signum: int, step: Optional[int] = None, checkpoint=None):
        super().__init__(signum, step, checkpoint)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def __str__(self):
        if self.step is None:
            return "interrupted before the first step; nothing to resume"
        return f"interrupted at step {self.step}; resume with --resume"


class StopFlag:
    """Which signal arrived (None: none yet)."""

    def __init__(self):
        self.signum: Optional[int] = None

    def __bool__(self):
        return self.signum is not None


@contextmanager
def graceful_stop():
    """Yield a StopFlag set by the first SIGINT / SIGTERM of the block."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def handler(signum, frame):
        flag.signum = signum
        for s, h in previous.items():  # a second signal acts at once
            signal.signal(s, h)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_raise():
    """For a command line: SIGTERM raises Interrupted like SIGINT raises KeyboardInterrupt, so
    a terminated command unwinds (locks released, temporaries removed) instead of dying."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
