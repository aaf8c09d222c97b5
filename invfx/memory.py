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

__all__ = ["peak_memory", "cpu_peak_memory", "cuda_peak_memory"]


def peak_memory(work: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, Any]:
    """Peak bytes allocated on ``device`` while ``work()`` runs, and its result."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_peak_memory(work, device)
    return cpu_peak_memory(work)


def cpu_peak_memory(work: Callable[[], Any]) -> tuple[int, Any]:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = work()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            allocation = event.typed[1]
            if allocation.device.type == "cpu":
                events.append((event.start_time_ns, allocation.alloc_size))
    events.sort()
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak, result


def cuda_peak_memory(work: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = work()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, result
