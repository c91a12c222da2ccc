"""Preemption: the one process-wide "save a checkpoint and stop" request, and the `Preempted` error that ends a run.

A signal handler (Slurm's pre-timeout SIGUSR2, see `stages.pipeline.run_pieces`) calls `request_checkpoint`; the
training loop polls `take_checkpoint_request` once per step, saves its state and raises `Preempted`; the job then
requeues itself (`saev.slurm.requeue`) and resumes from the checkpoint.
"""

import pathlib


class Preempted(Exception):
    """Training stopped because `request_checkpoint()` was called; rerun the same call to resume."""

    def __init__(self, step: int, n_steps: int, checkpoint_fpath: pathlib.Path | None):
        self.step = step
        """Steps done (and saved, if there is a checkpoint file)."""
        self.n_steps = n_steps
        """Steps of the whole run."""
        self.checkpoint_fpath = checkpoint_fpath
        """Where the state was saved; None if the run had no checkpoint file (nothing was saved)."""
        where = f"state saved to {checkpoint_fpath}" if checkpoint_fpath else "no checkpoint file, nothing saved"
        super().__init__(f"training preempted after step {step}/{n_steps} ({where})")


_checkpoint_requested = False
"""Set by `request_checkpoint`, cleared by the training loop that handles it. A plain bool: assigning it is
atomic, so a signal handler can set it at any point (a threading.Event's lock could deadlock there)."""


def request_checkpoint(*_: object) -> None:
    """Ask the running (or next) training loop to save its checkpoint at the end of the current step and raise
    `Preempted`. Safe to call from a signal handler; its signature fits one directly:
    `signal.signal(signal.SIGUSR2, preemption.request_checkpoint)`. The request stays pending until a loop takes it.
    """
    global _checkpoint_requested
    _checkpoint_requested = True


def take_checkpoint_request() -> bool:
    """Whether a checkpoint was requested since the last call; clears the request (the caller handles it)."""
    global _checkpoint_requested
    if not _checkpoint_requested:
        return False
    _checkpoint_requested = False
    return True
