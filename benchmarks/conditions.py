"""What a benchmark's figures depend on besides the code, printed with them; and how a figure's spread is shown."""

import os
import statistics
import sys

import beartype
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from saev import helpers  # noqa: E402


@beartype.beartype
def describe(when: str) -> str:
    """CPUs this process may use (and where that figure comes from), torch's threads and the load average."""
    n_cpus, why = helpers.allocated_cpus()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"conditions ({when}): {n_cpus} CPUs ({why}; {os.cpu_count()} on the machine), torch threads "
        f"{torch.get_num_threads()}, load average {load} (1, 5, 15 min)"
    )


@beartype.beartype
def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median (min-max, n rounds)'."""
    median, low, high = (fmt.format(f(values)) for f in (statistics.median, min, max))
    return f"{median} ({low}-{high}, {len(values)} rounds)"
