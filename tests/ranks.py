"""Multi-process tests that always end: run a function in one process per rank under a watchdog.

``torch.multiprocessing.spawn`` joins its processes with no deadline. A rank that never joins the rendezvous,
hangs in a collective or deadlocks while tearing gloo down left pytest waiting forever (issue 15: 150 minutes;
the hang seen here was the last one: ``~ProcessGroupGloo`` joins its worker thread while holding the GIL, and that
thread, destroying a finished barrier's work, waits for the GIL). :func:`run_ranks` instead

* starts each rank in a fresh (spawned) process and waits for all of them with a deadline;
* ends each rank with ``os._exit`` once its function has returned, so no process-group teardown runs at all;
  what the function returns is held until then (return the DDP module or the process group);
* as soon as one rank fails (raises, exits with a code, dies of a signal) or the deadline passes, kills the others
  and raises :class:`RanksFailed` saying which rank failed and why: its traceback, its exit code or signal, or
  for a rank still running at the deadline, where it was (a stack dump it writes when the watchdog asks, by
  ``SIGUSR1``, at the deadline: a dump timed by the rank itself came too late where spawning it, importing torch,
  took seconds on a loaded machine).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback

__all__ = ["RanksFailed", "run_ranks", "RANK_TIMEOUT"]

#: how long a multi-process test may take before its ranks are killed, seconds
RANK_TIMEOUT = 120.0


class RanksFailed(AssertionError):
    """A rank failed, or did not finish in time; the message says which and why."""


#: the signal a rank dumps its stack on (None where there is none: the rank times its own dump)
DUMP_SIGNAL = getattr(signal, "SIGUSR1", None)


def _entry(function, rank: int, world: int, args: tuple, report_dir: str, dump_after: float) -> None:
    with open(os.path.join(report_dir, f"stack_{rank}.txt"), "w") as stacks:
        # where a hung rank is, written when the parent asks, before it kills it
        if DUMP_SIGNAL is not None:
            faulthandler.register(DUMP_SIGNAL, file=stacks, all_threads=True)
        else:
            faulthandler.dump_traceback_later(dump_after, exit=False, file=stacks)
        try:
            kept = function(rank, world, *args)  # noqa: F841 - held, never torn down (see the module docstring)
        except BaseException:  # noqa: BLE001 - reported to the parent, whatever it is
            with open(os.path.join(report_dir, f"error_{rank}.txt"), "w") as error:
                error.write(traceback.format_exc())
            sys.stderr.flush()
            os._exit(1)
        faulthandler.cancel_dump_traceback_later()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(function, world: int, args: tuple = (), timeout: float = RANK_TIMEOUT) -> None:
    """Run ``function(rank, world, *args)`` in ``world`` processes; return when every one has returned, or raise
    :class:`RanksFailed` within ``timeout`` seconds (plus a few to kill) whatever the ranks do. ``function`` and
    ``args`` must pickle (a module-level function)."""
    context = multiprocessing.get_context("spawn")
    report_dir = tempfile.mkdtemp(prefix="invfx-ranks-")
    processes = [context.Process(target=_entry, args=(function, rank, world, args, report_dir, max(timeout - 3, 1)),
                                 daemon=True, name=f"rank {rank}") for rank in range(world)]
    start = time.monotonic()
    try:
        for process in processes:
            process.start()
        while True:
            codes = [p.exitcode for p in processes]
            failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                raise RanksFailed("; ".join(_why(rank, codes[rank], report_dir) for rank in failed) +
                                  _others(processes, failed, time.monotonic() - start))
            if all(code == 0 for code in codes):
                return
            if time.monotonic() - start > timeout:
                late = [rank for rank, code in enumerate(codes) if code is None]
                _ask_for_stacks([processes[rank] for rank in late], [_stack_path(rank, report_dir) for rank in late])
                raise RanksFailed(f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} still running "
                                  f"after {timeout:g} s (killed); " +
                                  "; ".join(_stack(rank, report_dir) for rank in late))
            multiprocessing.connection.wait([p.sentinel for p in processes if p.exitcode is None], timeout=0.5)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join(10)
        shutil.rmtree(report_dir, ignore_errors=True)


def _why(rank: int, code: int, report_dir: str) -> str:
    path = os.path.join(report_dir, f"error_{rank}.txt")
    if os.path.exists(path):
        with open(path) as error:
            return f"rank {rank} raised:\n{error.read().rstrip()}"
    if code < 0:
        return f"rank {rank} was killed by {signal.Signals(-code).name}"
    return f"rank {rank} exited with code {code}"


def _others(processes, failed: list[int], elapsed: float) -> str:
    running = [rank for rank, p in enumerate(processes) if rank not in failed and p.exitcode is None]
    return f" (after {elapsed:.1f} s; killed rank{'s' if len(running) > 1 else ''} " \
           f"{', '.join(map(str, running))})" if running else f" (after {elapsed:.1f} s)"


def _stack_path(rank: int, report_dir: str) -> str:
    return os.path.join(report_dir, f"stack_{rank}.txt")


def _ask_for_stacks(processes, paths: list[str], wait: float = 3.0) -> None:
    """Have each of ``processes`` dump its stack into its file, and wait (at most ``wait`` seconds) until each
    file holds one. Without a dump signal, wait for the dumps the ranks timed themselves."""
    if DUMP_SIGNAL is not None:
        for process in processes:
            try:
                os.kill(process.pid, DUMP_SIGNAL)
            except OSError:  # (it ended meanwhile)
                pass
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if all(os.path.exists(path) and os.path.getsize(path) for path in paths):
            time.sleep(0.1)  # (the rest of a dump being written)
            return
        time.sleep(0.05)


def _stack(rank: int, report_dir: str) -> str:
    path = _stack_path(rank, report_dir)
    text = open(path).read().strip() if os.path.exists(path) else ""
    return f"rank {rank} was at:\n{text}" if text else f"rank {rank}: no stack dump"
