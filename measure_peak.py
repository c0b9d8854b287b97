"""measure_peak.py -- --measure-peak on a CPU: the measured peak of live tensors in a training
step, beside the memory plan. Imported only under that flag (common.peak_meter).

On CUDA the peak is free (torch.cuda.max_memory_allocated, common.StepPeak). A CPU has no
allocator statistics, so this records the step with torch's profiler (profile_memory=True): it
lists every allocation and free with its time, and their running sum in time order peaks where
max_memory_allocated would. The profiler slows the measured steps about 2x and reading its
records costs about 10x a step, so only steps whose batch is the largest yet are recorded (a
handful in a whole run), and only the largest one's records are read, once, when `mb` is asked.
The profiler prints two lines from C++ at each start and stop, which no Python setting turns
off: file descriptor 2 is silenced around it.
"""
import contextlib
import os
import sys

import torch

import common


@contextlib.contextmanager
def quiet_fd2():
    """Silence file descriptor 2 for a moment (the profiler's C++ lines)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class ProfiledPeak(common.StepPeak):
    """common.StepPeak, measured on a CPU by the profiler."""

    def __init__(self, device, model, optimizer):
        super().__init__(device, model, optimizer)
        self.records = None  # (held, profile) of the largest step, unread

    @property
    def mb(self):
        if self.records:
            held, prof = self.records
            now = peak = 0
            for e in sorted(prof.function_events, key=lambda e: e.time_range.start):
                now += e.self_cpu_memory_usage  # + what the op allocated, - what it freed
                peak = max(peak, now)
            self.measured, self.records = max(self.measured or 0, round((held + peak) / 2**20, 1)), None
        return self.measured

    @contextlib.contextmanager
    def measure(self, size):
        # under torchrun, not at all: quiet_fd2 would also silence what gloo prints from C++
        # mid-step, and the ranks' batches (their slices) differ, so each would measure other steps
        ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not self.largest_yet(size) or ddp:
            yield
            return
        held = self.held()
        with quiet_fd2(), torch.autograd.profiler.profile(use_kineto=False, profile_memory=True) as prof:
            yield
        self.records = held, prof  # a smaller step's records are dropped unread
