"""A quiet terminal: while a command runs, the libraries' logs, warnings and prints go to a log file; densevision's
own results go to the terminal through :func:`say`, its progress bars to standard error.

mmengine's loggers write to the ``sys.stdout`` they find when they are created and mmdet / mmseg warn at import:
redirecting ``sys.stdout`` and capturing warnings while the command runs catches both, without touching the
libraries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_console: list[IO[str]] = []  # where say() writes: the terminal's stdout while a command runs


def say(*parts: Any) -> None:
    """Print densevision's own output to the terminal, also while the libraries' output goes to the log file."""
    stream = _console[-1] if _console else sys.stdout
    print(*parts, file=stream, flush=True)


def default_log_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densevision" / "logs"


class LogFile:
    """A text stream appending to ``path``, opened (and its folder created) at the first write: a run that logs
    nothing leaves no file. Where ``path`` cannot be created, it writes to :func:`default_log_dir` instead (and
    ``path`` says so)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def _open(self) -> IO[str]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a", encoding="utf-8")
        except OSError:
            self.path = default_log_dir() / self.path.name
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open(self.path, "a", encoding="utf-8")

    def write(self, text: str) -> int:
        try:
            if self._file is None:
                self._file = self._open()
            return self._file.write(text)
        except OSError:  # e.g. the output's disk is full: the run's own error says so; the log must not fail it
            return self._elsewhere(text)

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError:
                self._elsewhere("")

    def _elsewhere(self, text: str) -> int:
        """Carry on in :func:`default_log_dir` (once); where that cannot be written either, the text is dropped."""
        fallback = default_log_dir() / self.path.name
        if self.path != fallback:
            with contextlib.suppress(OSError):
                if self._file is not None:
                    self._file.close()
            self._file, self.path = None, fallback
            with contextlib.suppress(OSError):
                self._file = self._open()
                return self._file.write(text)
        return len(text)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def isatty(self) -> bool:
        return False


class _Tee:
    """A text stream writing to several."""

    def __init__(self, *streams: IO[str] | LogFile) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()

    def isatty(self) -> bool:
        return False


class _Stdout:
    """What ``sys.stdout`` is while commands run: it writes to the running command's log stream. Loggers keep the
    stream they found when they were made (mmengine's live for the process): this one outlives each command, and
    between commands it writes to the terminal."""

    def __init__(self) -> None:
        self.targets: list[IO[str] | _Tee | LogFile] = []

    def write(self, text: str) -> int:
        target = self.targets[-1] if self.targets else sys.__stdout__
        return target.write(text) if target is not None else len(text)

    def flush(self) -> None:
        target = self.targets[-1] if self.targets else sys.__stdout__
        if target is not None:
            target.flush()

    def isatty(self) -> bool:
        return False


_STDOUT = _Stdout()


@contextlib.contextmanager
def library_output(log: LogFile, *, verbose: bool = False) -> Iterator[LogFile]:
    """Send the libraries' logging records, warnings and standard output to ``log``, and with ``verbose`` to the
    terminal as well."""
    console = sys.stdout
    with contextlib.closing(log):
        handler = logging.StreamHandler(_Tee(log, sys.stderr) if verbose else log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        _console.append(console)
        _STDOUT.targets.append(_Tee(log, console) if verbose else log)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(_STDOUT):
                warnings.simplefilter("default")
                yield log
        finally:
            _STDOUT.targets.pop()
            _console.pop()
            logging.captureWarnings(False)
            root.removeHandler(handler)
            root.setLevel(old_level)
