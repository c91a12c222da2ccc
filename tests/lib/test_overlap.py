"""Overlapped steps: the serial run's results and its state at a failure, memory bounded by the queues."""

import threading

import pytest

from saev.overlap import run_overlapped


class Recorder:
    """Steps that record what they did; `fail` maps (step, item) to the exception that step raises."""

    def __init__(self, fail: dict[tuple[str, int], BaseException] | None = None):
        self.fail = fail or {}
        self.written: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def check(self, step: str, item: int) -> None:
        if (step, item) in self.fail:
            raise self.fail[step, item]

    def prepare(self, item: int) -> int:
        self.check("prepare", item)
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        return item * 10

    def compute(self, item: int, prepared: int) -> int:
        self.check("compute", item)
        return prepared + 1

    def write(self, item: int, computed: int) -> None:
        self.check("write", item)
        self.written.append((item, computed))
        with self.lock:
            self.in_flight -= 1


@pytest.mark.parametrize("overlap", [True, False])
def test_every_item_is_written_in_order_with_its_result(overlap):
    steps = Recorder()
    run_overlapped(range(50), steps.prepare, steps.compute, steps.write, ahead=3, behind=2, overlap=overlap)
    assert steps.written == [(i, i * 10 + 1) for i in range(50)]


def test_items_in_flight_are_bounded_by_the_queues():
    steps = Recorder()
    run_overlapped(range(200), steps.prepare, steps.compute, steps.write, ahead=2, behind=1)
    # ahead in the first queue, one in each of the three steps' hands, behind in the second queue
    assert steps.most_in_flight <= 2 + 3 + 1


@pytest.mark.parametrize("step", ["prepare", "compute", "write"])
def test_a_failing_step_raises_its_own_error_after_writing_the_items_before_it_as_the_serial_run_does(step):
    err = OSError(28, "No space left on device") if step == "write" else ValueError(f"{step} failed on item 7")
    serial, overlapped = Recorder({(step, 7): err}), Recorder({(step, 7): err})
    with pytest.raises(type(err)) as serial_raised:
        run_overlapped(range(20), serial.prepare, serial.compute, serial.write, overlap=False)
    with pytest.raises(type(err)) as overlapped_raised:
        run_overlapped(range(20), overlapped.prepare, overlapped.compute, overlapped.write, ahead=4, behind=3)
    assert serial_raised.value is err and overlapped_raised.value is err
    assert overlapped.written == serial.written == [(i, i * 10 + 1) for i in range(7)]


def test_a_write_error_wins_over_a_later_items_prepare_error():
    """The serial run stops at the earlier item's write: the later prepare error is never seen."""
    write_err, prepare_err = OSError(5, "I/O error"), ValueError("unreadable image")
    steps = Recorder({("write", 2): write_err, ("prepare", 3): prepare_err})
    with pytest.raises(OSError) as raised:
        run_overlapped(range(10), steps.prepare, steps.compute, steps.write, ahead=4, behind=4)
    assert raised.value is write_err and steps.written == [(0, 1), (1, 11)]


def test_no_thread_is_left_running_after_an_error():
    before = set(threading.enumerate())
    steps = Recorder({("compute", 3): RuntimeError("boom")})
    with pytest.raises(RuntimeError):
        run_overlapped(range(100), steps.prepare, steps.compute, steps.write, ahead=2, behind=2)
    assert set(threading.enumerate()) <= before
