"""A large cell's rows shared between the stitcher's thread and helper threads (densevision.stitch.rows)."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from densevision.stitch import rows


@pytest.fixture
def split(monkeypatch):
    """Any cell of 10 or more elements split into bands of 10 elements, with two helpers."""
    monkeypatch.setattr(rows, "SPLIT_ELEMENTS", 10)
    monkeypatch.setattr(rows, "BAND_ELEMENTS", 10)
    monkeypatch.setattr(rows, "helpers", lambda: 2)


def test_bands_cover_the_rows_once_in_order_and_run_on_helper_threads_too(split):
    # Whoever runs a band first waits for the other side to run one: both the caller and a helper take part.
    main_ran, helper_ran = threading.Event(), threading.Event()
    ran: list[tuple[int, int, str]] = []

    def band(r0: int, r1: int) -> tuple[int, int]:
        mine, theirs = (
            (main_ran, helper_ran) if threading.current_thread() is threading.main_thread() else (helper_ran, main_ran)
        )
        mine.set()
        theirs.wait(timeout=30)
        ran.append((r0, r1, threading.current_thread().name))
        return r0, r1

    result = rows.by_rows(band, 37, 5)  # 2 rows a band
    assert result == [(r, min(r + 2, 37)) for r in range(0, 37, 2)]
    assert sorted((a, b) for a, b, _ in ran) == result
    names = {name for *_, name in ran}
    assert threading.main_thread().name in names
    assert any(name.startswith("densevision-rows") for name in names)


def test_a_small_cell_is_one_call_on_the_calling_thread(split):
    calls: list[tuple[int, int, threading.Thread]] = []
    assert rows.by_rows(lambda a, b: calls.append((a, b, threading.current_thread())) or "done", 3, 3) == ["done"]
    assert calls == [(0, 3, threading.current_thread())]


def test_without_helpers_a_large_cell_is_one_call(monkeypatch):
    monkeypatch.setattr(rows, "SPLIT_ELEMENTS", 1)
    monkeypatch.setattr(rows, "helpers", lambda: 0)
    assert rows.by_rows(lambda a, b: (a, b), 100, 100) == [(0, 100)]


def test_an_error_in_a_band_is_raised_once_every_started_band_has_ended(split):
    running = 0
    lock = threading.Lock()

    def band(r0: int, r1: int) -> None:
        nonlocal running
        with lock:
            running += 1
        try:
            time.sleep(0.002)
            if r0 == 6:
                raise OSError("no space left on device")
        finally:
            with lock:
                running -= 1

    with pytest.raises(OSError, match="no space left"):
        rows.by_rows(band, 40, 5)
    assert running == 0


def _split_in_child(queue) -> None:
    rows.SPLIT_ELEMENTS, rows.BAND_ELEMENTS = 10, 10
    rows.helpers = lambda: 1
    queue.put(rows.by_rows(lambda a, b: (a, b), 8, 5))


def test_a_forked_child_gets_its_own_helper_threads(split):
    rows.by_rows(lambda a, b: None, 8, 5)  # the parent's pool exists; its threads do not survive a fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_split_in_child, args=(queue,))
    child.start()
    assert queue.get(timeout=60) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    child.join(timeout=60)
    assert child.exitcode == 0
