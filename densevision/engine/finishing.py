"""A task's finishing step in its own process, beside the prediction: it follows the work folder's rows as they are
committed, so compressing and writing the outputs overlap the model instead of following it, and take no GIL from
the model's loop.

The parent forks it before predicting (:class:`FinishingProcess`). It reads each row once it is committed
(:meth:`Follow.wait_for`); before its outputs go into place it waits for the parent's word that every row is in
(:meth:`Follow.wait_for_commit`). On the parent's word to stop, or the parent's death, it drops its outputs (the
writers' own abort) and ends: nothing that looks finished is left. Where ``fork`` is not available (Windows) the
step runs after the prediction instead (:func:`can_finish_alongside`).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from densevision.engine.heap import release_freed_memory
from densevision.errors import OutputError

POLL_SECONDS = 0.05  # how often a waiting finisher looks for its next row and its parent's word
_COMMIT, _STOP = "commit", "stop"


class Stopped(Exception):
    """The finisher was told to stop, or its parent is gone: its outputs are dropped."""


def can_finish_alongside() -> bool:
    """Whether the finishing step can run beside the prediction here: it needs ``fork`` (the process inherits the
    job as it is, open image included; nothing is pickled)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


class Follow:
    """The finishing process's side: waits for rows and for the parent's word."""

    def __init__(self, conn: Connection, parent: int) -> None:
        self._conn, self._parent = conn, parent
        self._committed = False

    def _listen(self, timeout: float) -> None:
        """Take the parent's word if one comes within ``timeout`` seconds; raise Stopped on 'stop' or if the parent
        is gone."""
        if os.getppid() != self._parent:
            raise Stopped("the predicting process is gone")
        try:
            word = self._conn.recv() if self._conn.poll(timeout) else None
        except EOFError:
            raise Stopped("the predicting process is gone") from None
        if word == _STOP:
            raise Stopped("told to stop")
        self._committed = self._committed or word == _COMMIT

    def wait_for(self, path: Path) -> None:
        """Return once ``path`` (a row's file, renamed into place when complete) exists."""
        release_freed_memory()  # the last row's arrays (see densevision.engine.heap)
        self._listen(0)
        while not path.is_file():
            if self._committed:  # every row is in, says the parent, but not this one
                raise OutputError(f"{path}: a committed row is missing from the work folder; run again with --resume")
            self._listen(POLL_SECONDS)

    def wait_for_commit(self) -> None:
        """Return once the parent says every row is in: the outputs may go into place."""
        while not self._committed:
            self._listen(POLL_SECONDS)


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the parent dies (SIGKILL included), so no orphan keeps writing
    the outputs' partial files that a resumed run writes again."""
    # Elsewhere the parent-death check in Follow still ends it at its next wait.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class FinishingTraceback(Exception):
    """Where the finishing process's error came from: its traceback, kept as the cause of the error the parent
    raises (pickling drops the error's own cause), for the log."""

    def __str__(self) -> str:
        return str(self.args[0])


def _run(step: Callable[[Follow], dict[str, Any]], conn: Connection, parent: int) -> None:
    _die_with_parent()
    try:
        reply: tuple[str, Any, str] = ("done", step(Follow(conn, parent)), "")
    except BaseException as e:  # the parent raises it (a typed error keeps its type and one-line message)
        reply = ("error", e, traceback.format_exc())
    try:
        conn.send(reply)
    except (pickle.PicklingError, TypeError, AttributeError):
        error = reply[1]
        conn.send(("error", OutputError(f"writing the outputs failed: {type(error).__name__}: {error}"), reply[2]))
    except OSError:
        pass  # a parent that is gone, or that stopped us, reads nothing


class FinishingProcess:
    """Runs ``step(follow)`` in a forked process from now on; :meth:`result` gives its return value (or raises its
    error) once the caller has committed every row, :meth:`stop` drops it."""

    def __init__(self, step: Callable[[Follow], dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_run, args=(step, child, os.getpid()), name="densevision-finish")
        self._process.start()
        child.close()

    def result(self) -> dict[str, Any]:
        """Tell the finisher that every row is committed; wait for its outputs to be in place."""
        try:
            self._conn.send(_COMMIT)
            kind, value, where = self._conn.recv()
        except (EOFError, OSError):
            self._process.join()
            raise OutputError(
                f"the process writing the outputs ended without a result (exit code {self._process.exitcode}); "
                "run again with --resume"
            ) from None
        self._process.join()
        if kind == "error":
            raise value from FinishingTraceback(where)
        return dict(value)

    def stop(self) -> None:
        """Drop the finisher and its outputs, if it still runs (after :meth:`result`: nothing to do)."""
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(_STOP)
            self._process.join(timeout=30)
            if self._process.is_alive():  # busy on one large row: its partial files are redone by a resume
                self._process.kill()
                self._process.join()
        self._conn.close()
