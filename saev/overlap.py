"""Three steps over a sequence of items, overlapped on threads: prepare ahead, compute, write behind.

`run_overlapped` prepares item i + 1 on one thread and writes item i - 1 on another while item i is computed on the
calling thread (which keeps the model, its device and torch's threads), with bounded queues between them, so memory
stays at `ahead + behind + 3` items (one in each step's hands). Items are prepared, computed and written in order,
each step on one thread, so the results are the ones the steps give run one after the other (`overlap=False`, the
serial reference).

An exception raised by any step is re-raised in the caller, the same exception object, once no thread is working:
the items before the failing one are written first and none after it, so what is on disk is what the serial run
leaves when it stops at the same item (a writer that resumes from its finished pieces sees the same state).
"""

import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import beartype

Item = TypeVar("Item")
Prepared = TypeVar("Prepared")
Computed = TypeVar("Computed")

_POLL_S = 0.05
"""How often a thread blocked on a queue checks whether the run stopped."""

_DONE = object()
"""Sent to the writing thread after the last item."""


class _Failed:
    """In a queue in place of an item: its step raised `err`."""

    def __init__(self, err: BaseException):
        self.err = err


@beartype.beartype
def run_overlapped(
    items: Sequence[Item],
    prepare: Callable[[Item], Prepared],
    compute: Callable[[Item, Prepared], Computed],
    write: Callable[[Item, Computed], None],
    *,
    ahead: int = 1,
    behind: int = 1,
    overlap: bool = True,
) -> None:
    """`write(item, compute(item, prepare(item)))` for every item in order; with `overlap`, `prepare` runs on a
    thread up to `ahead` items ahead and `write` on another thread up to `behind` items behind, while `compute` runs
    on the calling thread. Re-raises the exception of the first item whose step failed (see the module docstring)."""
    if ahead < 1 or behind < 1:
        raise ValueError(f"ahead and behind must be at least 1, got {ahead} and {behind}")
    if not overlap:
        for item in items:
            write(item, compute(item, prepare(item)))
        return
    stop = threading.Event()
    prepared: queue.Queue = queue.Queue(maxsize=ahead)
    computed: queue.Queue = queue.Queue(maxsize=behind)
    write_error: list[BaseException] = []

    def put(q: queue.Queue, value: object) -> bool:
        """Put `value`, waiting for room unless the run stops (then False)."""
        while not stop.is_set():
            try:
                q.put(value, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def preparing() -> None:
        for item in items:
            try:
                value = prepare(item)
            except BaseException as err:  # re-raised by the caller, after the items before this one are written
                put(prepared, _Failed(err))
                return
            if not put(prepared, value):
                return

    def writing() -> None:
        while True:
            try:
                got = computed.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if got is _DONE:
                return
            try:
                write(*got)
            except BaseException as err:
                write_error.append(err)
                stop.set()  # nothing after a failed write: the other threads stop
                return

    threads = [threading.Thread(target=f, name=f"saev-{f.__name__}", daemon=True) for f in (preparing, writing)]
    for thread in threads:
        thread.start()
    error: BaseException | None = None
    try:
        for item in items:
            got = _Failed(RuntimeError("stopped"))  # replaced below unless a failed write stopped the run
            while not stop.is_set():
                try:
                    got = prepared.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    pass
            if isinstance(got, _Failed):
                error = got.err
                break
            if not put(computed, (item, compute(item, got))):
                break
    except BaseException as err:
        error = err
    # The items computed so far are written (unless a write failed), then the threads end.
    if not put(computed, _DONE):
        stop.set()
    threads[1].join()
    stop.set()
    threads[0].join()
    if write_error:  # an earlier item than any failure of this thread's
        raise write_error[0]
    if error is not None:
        raise error
