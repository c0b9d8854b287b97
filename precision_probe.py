"""precision_probe.py -- on a CPU with bf16 units, is this model's training step faster in bf16?

Imported only by common.measure_precision, only when it has something to time: --precision auto
on a CPU whose /proc/cpuinfo lists amx_bf16 or avx512_bf16, not --quick, not a resume. A trainer
copied without this file stays in fp32 there, and its start line says why.

How it works: the caller hands in step(amp_dtype), one forward + backward of the model at the
run's micro-batch, wrapped so that it leaves the RNG and the model's buffers as they were. After
one warm-up call each (the first call allocates and picks its kernels), fp32 and bf16 are timed
alternately, best of 3 to 30 rounds (about 2 s in all): other load on the machine hits both alike,
and the best is what each precision can do. Fewer rounds were fooled on a busy 2-core machine (a
4x128 GPT read 1.9x faster in bf16; it runs 0.75x). Matmul-bound shapes gain up to 2x, small ones
lose. Under torchrun every rank times its own step and all take rank 0's figures, so all agree.
"""
import math
import time

import torch


def time_step(step, budget_s=2.0):
    """(fp32 ms, bf16 ms): the best time of step(None) and of step(torch.bfloat16)."""
    best = {None: math.inf, torch.bfloat16: math.inf}
    t0 = time.perf_counter()
    for dt in best:
        step(dt)  # warm-up
    for _ in range(min(30, max(3, math.ceil(budget_s / max(1e-3, time.perf_counter() - t0))))):
        for dt in best:
            t0 = time.perf_counter()
            step(dt)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    figures = [(1e3 * best[None], 1e3 * best[torch.bfloat16])]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(figures, src=0)
    return figures[0]


def choose(step, margin=1.2):
    """(precision, why): "bf16" when step runs `margin` times faster in it than in fp32, else "fp32"."""
    fp32_ms, bf16_ms = time_step(step)
    precision = "bf16" if fp32_ms >= margin * bf16_ms else "fp32"
    return precision, (f"CPU: {precision} by measurement: this model's step {fp32_ms:.1f} ms in fp32, "
                       f"{bf16_ms:.1f} ms in bf16 (bf16 needs {margin:.2f}x to win)")
