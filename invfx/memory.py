"""Exact peak memory of a piece of work.

CPU: run it under ``torch.profiler`` with ``profile_memory=True`` and replay every allocation and free in time
order; the peak is the largest running sum. This sees temporaries inside kernels and ``storage.resize_(0)``,
which sampling RSS or allocator counters do not. CUDA: ``torch.cuda.max_memory_allocated``.
The figure is the peak *above* what was allocated before the work started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["mib", "peak_memory", "cpu_peak_memory", "cpu_steady_peak_memory", "cuda_peak_memory", "cpu_memory_timeline"]


def peak_memory(work: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    """Peak bytes allocated on ``device`` while ``work()`` runs, and its result."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_memory(work, device)
    return cpu_peak_memory(work)


def cpu_peak_memory(work: Callable[[], Any]) -> tuple[int, Any]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    events, _ = _allocation_events(prof)
    return _peak(events), result


_SECOND_RUN = "invfx.memory.second_run"


def cpu_steady_peak_memory(work: Callable[[], Any], between: Callable[[], Any] | None = None) -> int:
    """Peak bytes of the second of two profiled runs of ``work``, above what was allocated at its start.

    The profiler drops the free of a block allocated before profiling began, so state that a module keeps from
    one step to the next and replaces in the next (revlib stores ``torch.get_rng_state()`` on every wrapped
    module at every forward) looks like new memory in :func:`cpu_peak_memory`. Profiling a first run makes that
    state inside the profile, so the second run's frees are seen. ``between()`` runs between the two
    (zeroing gradients, say).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
        if between is not None:
            between()
        with record_function(_SECOND_RUN):
            work()
    events, boundary = _allocation_events(prof, _SECOND_RUN)
    if boundary is None:
        raise RuntimeError("the profiler lost the marker of the second run")
    running, start, peak = 0, None, 0
    for when, size in events:
        if when >= boundary and start is None:
            start = peak = running
        running += size
        if start is not None:
            peak = max(peak, running)
    return 0 if start is None else peak - start


def cpu_memory_timeline(work: Callable[[], Any]) -> tuple[list[float], list[int]]:
    """Bytes allocated over time while ``work()`` runs on CPU, above what was allocated at its start: the same
    replay of ``torch.profiler`` allocation events as :func:`cpu_peak_memory`, every step of the running sum
    kept. Returns (milliseconds since the first event, bytes), one point per allocation or free."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events, _ = _allocation_events(prof)
    if not events:
        return [], []
    start, running, times, sizes = events[0][0], 0, [], []
    for when, size in events:
        running += size
        times.append((when - start) / 1e6)
        sizes.append(running)
    return times, sizes


def _allocation_events(prof, marker: str | None = None) -> tuple[list[tuple[int, int]], int | None]:
    """CPU allocations (+bytes) and frees (-bytes) in time order, and when the ``marker`` range began."""
    from torch._C._profiler import _EventType

    events, boundary = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocation = event.typed[1]
            if allocation.device.type == "cpu":
                events.append((event.start_time_ns, allocation.alloc_size))
        elif marker is not None and event.name == marker:
            boundary = event.start_time_ns
    events.sort()
    return events, boundary


def _peak(events) -> int:
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak


def cuda_peak_memory(work: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = work()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, result


def mib(nbytes: int) -> str:
    """Bytes as MiB for reports, three decimals."""
    return f"{nbytes / 2**20:.3f}"
