"""What a benchmark's figures depend on besides the code, printed with them; and how a figure's spread is shown."""

import os
import statistics
import sys
import time

import beartype
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saev import helpers  # noqa: E402

_start: tuple[float, list[int], float] | None = None
"""(wall time, the machine's CPU ticks from /proc/stat, this process's CPU seconds) when `describe` first ran."""


def _cpu_ticks() -> list[int]:
    """user, nice, system, idle, iowait, irq, softirq, steal ticks of all CPUs together (empty where unavailable)."""
    try:
        with open("/proc/stat") as fd:
            return [int(x) for x in fd.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("?" where unavailable)."""
    try:
        with open("/proc/cpuinfo") as fd:
            return next((line.split(":", 1)[1].strip() for line in fd if line.startswith("model name")), "?")
    except OSError:
        return "?"


@beartype.beartype
def describe(when: str) -> str:
    """CPUs this process may use (and where that figure comes from), torch's threads and the load average; from the
    second call on, also how the machine's CPU time went since the first: busy, this process's share, steal."""
    global _start
    n_cpus, why = helpers.allocated_cpus()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    line = (
        f"conditions ({when}): {n_cpus} CPUs ({why}; {os.cpu_count()} on the machine: {_cpu_model()}), torch threads "
        f"{torch.get_num_threads()}, load average {load} (1, 5, 15 min)"
    )
    times = os.times()
    now = (time.perf_counter(), _cpu_ticks(), times.user + times.system)
    if _start is None:
        _start = now
    elif now[1] and _start[1]:
        delta = [b - a for a, b in zip(_start[1], now[1], strict=False)]
        total = sum(delta) or 1
        idle, steal = delta[3] + delta[4], delta[7]
        cpu_s = (now[0] - _start[0]) * (os.cpu_count() or 1)
        line += (
            f"; since the start the machine's CPUs were {100 * (total - idle) / total:.0f}% busy, this process used "
            f"{100 * (now[2] - _start[2]) / cpu_s:.0f}% of them, steal {100 * steal / total:.1f}%"
        )
    return line


@beartype.beartype
def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max, n rounds)'."""
    median, low, high = (fmt.format(f(values)) for f in (statistics.median, min, max))
    return f"{median} ({low}-{high}, {len(values)} rounds)"
