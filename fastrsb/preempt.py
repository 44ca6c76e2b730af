"""Signals mean "checkpoint and stop": what a run does when a scheduler warns it before the kill.

SLURM sends SIGTERM (or SIGUSR1 with `--signal=USR1@SECONDS`) and SIGKILL after a grace period; spot
instances and Kubernetes send SIGTERM. On either signal `fastrsb train` finishes the optimizer step in
progress, writes an atomic mid-epoch checkpoint, logs it and exits with status PREEMPTED_EXIT (75,
sysexits' EX_TEMPFAIL: try again). `--resume` then continues at the next step, bit-identical to a run
never stopped.

Under torchrun the signal may reach only some ranks, so they agree at a step boundary
(`StopRequests.should_stop`): at every boundary each rank posts its flag in an asynchronous
all-reduce (MAX) over a small gloo group of its own and reads the one it posted at the previous
boundary. Every rank therefore sees the same answer at the same step, one step after the first
signal. The flag is a CPU tensor, so no device synchronisation is added; the wait is for an all-reduce
issued a whole step earlier (its cost on a GPU run is not measured yet).

A second signal changes nothing: it is often the same warning again (SLURM signals every process of
the job, and a sweep passes it on to its run as well), and the stop is already under way. Ctrl-C
(SIGINT) still interrupts at once, and SIGKILL kills. Checkpoints are written to a temporary file and
renamed, so a kill during the write (the grace period's SIGKILL) leaves the previous checkpoint as
it was.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from .errors import FastRSBError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: the run is checkpointed; the same command with --resume continues it


class Preempted(FastRSBError):
    """A run stopped on a signal after checkpointing; the command's exit status is PREEMPTED_EXIT."""


class _Handlers:
    """SIGTERM/SIGUSR1 handlers for the main thread: the first signal is noted, later ones change
    nothing (module docstring). Elsewhere than in the main thread nothing is installed
    (Python only lets the main thread set handlers): the run then stops as the signal's default says."""

    def __init__(self, announce: str):
        self.received: str | None = None
        self.announce = announce
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"{name} received: already stopping ({self.received} came first)", file=sys.stderr, flush=True)
            return
        self.received = name
        print(f"{name} received: {self.announce}", file=sys.stderr, flush=True)
        self.on_signal(signum)

    def on_signal(self, signum: int) -> None:
        pass


class StopRequests(_Handlers):
    """The trainer's side: `should_stop()` at every optimizer-step boundary (module docstring)."""

    def __init__(self, dist_info):
        super().__init__("finishing this step, then writing a checkpoint and stopping")
        self.group = None
        self._posted = None  # (work, flag) of the previous boundary
        if dist_info.enabled:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")  # every rank makes it, in the same order

    def should_stop(self) -> bool:
        """Whether the run stops after this step: the same answer on every rank at the same step."""
        if self.group is None:
            return self.received is not None
        import torch
        import torch.distributed as dist

        agreed = False
        if self._posted is not None:
            work, flag = self._posted
            work.wait()
            agreed = bool(flag.item())  # a CPU tensor: no device synchronisation
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int32)
        self._posted = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def close(self) -> None:
        self.restore()
        if self._posted is not None:
            try:
                self._posted[0].wait()
            except RuntimeError:  # a rank already gone: the run is ending with that error anyway
                pass
            self._posted = None


class _Forwarding(_Handlers):
    def __init__(self):
        super().__init__("passing it to the runs in progress, which checkpoint and stop; no new run starts")
        self.children: list = []

    def on_signal(self, signum: int) -> None:
        for child in list(self.children):
            if child.poll() is None:
                child.send_signal(signum)


@contextlib.contextmanager
def forward_stop_signals():
    """For a process that runs others (sweep): a stop signal is passed to every child in `.children`
    and noted in `.received`."""
    handlers = _Forwarding()
    handlers.install()
    try:
        yield handlers
    finally:
        handlers.restore()
