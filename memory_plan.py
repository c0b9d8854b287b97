"""memory_plan.py -- what a training step will hold at its peak, said before the first step, and
the peak the steps really reach, measured beside it. Every trainer builds one Plan after its
optimizer (common.memory_plan); `--plan` prints it and stops.

The plan adds four parts, in bytes:
  weights + buffers     the tensors themselves (under autocast their bf16 copies count as activations)
  gradients             one per trainable weight, the weight's dtype
  optimizer state       AdamW: two moments per weight; adamw8bit: 2 bytes a weight; Adafactor: a row
                        and a column per matrix (counted from the shapes: the state appears at step 1)
  activations           what one micro-batch's forward keeps for backward: every tensor autograd
                        saves (saved_tensors_hooks sees each), once per storage, the weights left out.
                        Measured on 1 and 2 items and extended to the micro-batch (activations are
                        affine in it): a forward of the whole batch would leave its memory in the heap.
Under DDP the gradient buckets add a copy of the gradients; on CUDA, AdamW's foreach step (not fused)
takes sqrt(exp_avg_sq) of every weight at once, after the activations are freed.

The measured peak (summary.json's peak_tensor_mb): what the step held when it began + the most it
allocated on top, taken only in steps whose batch is the largest yet. On CUDA it is free
(max_memory_allocated). A CPU has no allocator statistics: under --measure-peak torch's profiler
records the step (profile_memory=True: every allocation and free with its time; their running sum
in time order peaks where max_memory_allocated would). That slows the recorded steps about 2x and
reading the records costs about 10x a step, so only the largest step's records are read, once. The
profiler prints two lines from C++ at each start and stop, which no Python setting turns off: file
descriptor 2 is silenced around it.
"""
import contextlib
import os
import sys

import torch

import common


def optimizer_state_bytes(optimizer, planned=False):
    """Bytes of the optimizer's state; planned=True: once every weight has taken a step (AdamW, AdamW8bit and
    Adafactor make theirs lazily, in the first step; others, e.g. Adagrad, have it from the start)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if planned and hasattr(optimizer, "planned_state_bytes"):  # AdamW8bit
        return sum(optimizer.planned_state_bytes(p) for p in params)
    if planned and isinstance(optimizer, torch.optim.Adafactor):  # a matrix's 2nd moment: a row and a column
        return sum(4 * (p.numel() // p.shape[-1] + p.numel() // p.shape[-2] if p.dim() > 1 else p.numel()) + 4
                   for p in params)
    if planned and isinstance(optimizer, torch.optim.AdamW):
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)  # exp_avg, exp_avg_sq, step
    return common.tensor_bytes([list(st.values()) for st in optimizer.state.values()])


def activation_bytes(model, loss_fn, batch, device, amp_dtype):
    """Bytes that a forward of this micro-batch keeps for backward (see the header); +29 MB of peak RSS
    for the LM at nanoGPT's CPU shape, had the whole micro-batch been run."""
    n = len(next(iter(batch.values())))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(m):
        part = {k: v[:m].clone() for k, v in batch.items()}  # a clone: a view would count the whole batch
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                saved[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), common.autocast(device, amp_dtype):
            loss_sum, _ = loss_fn(model, part)
        del loss_sum  # frees the graph and what it saved
        return sum(saved.values())

    with common.side_effect_free(model, device):
        one, two = saved_bytes(1), saved_bytes(min(2, n))
    return one + (two - one) * (n - 1)


def plan_parts(model, optimizer, loss_fn, batch, *, device, amp_dtype, world, log, worst):
    """The plan in MB ({part: MB, "total": MB}, summary's memory_plan_mb), logged in one line."""
    params = list(model.parameters())
    parts = {"weights": common.tensor_bytes(params) + common.tensor_bytes(list(model.buffers())),
             "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
             "optimizer": optimizer_state_bytes(optimizer, planned=True),
             "activations": activation_bytes(model, loss_fn, batch, device, amp_dtype)}
    if world > 1:
        parts["ddp_buckets"] = parts["gradients"]
    total = sum(parts.values())
    if device.type == "cuda" and isinstance(optimizer, torch.optim.AdamW) and not optimizer.defaults.get("fused"):
        parts["step_temporary"] = parts["gradients"]  # only after the activations are freed
        total += max(0, parts["step_temporary"] - parts["activations"])
    plan = {k: round(v / 2**20, 1) for k, v in parts.items()}
    plan["total"] = round(total / 2**20, 1)
    micro_bs = len(next(iter(batch.values())))
    name = "AdamW 8-bit" if hasattr(optimizer, "planned_state_bytes") else type(optimizer).__name__
    log(f"memory plan: weights {plan['weights']} MB + gradients {plan['gradients']} + {name} state "
        f"{plan['optimizer']} + activations {plan['activations']} (measured on 1 and 2 x {worst}, for {micro_bs})"
        + (f" + DDP buckets {plan['ddp_buckets']}" if world > 1 else "")
        + (f" (or AdamW's step temporary {plan['step_temporary']}, if larger)" if "step_temporary" in plan else "")
        + f" = {plan['total']} MB")
    return plan


class Plan:
    """The plan (.mb, logged when built), the meter of the steps' peak (`with plan.measure(size): ...one
    train_step...`, size: the batch's padded elements) and summary.json's memory fields (.figures)."""

    def __init__(self, model, optimizer, loss_fn, batch, *, args, device, **kw):
        self.mb = plan_parts(model, optimizer, loss_fn, batch, device=device, **kw)
        self.optimizer, self.optim = optimizer, args.optim
        self.peak = (ProfiledPeak if args.measure_peak and device.type == "cpu" else StepPeak)(device, model, optimizer)

    def measure(self, size):
        return self.peak.measure(size)

    def figures(self, log=print):
        peak = self.peak.mb
        if peak:
            log(f"measured peak of live tensors {peak} MB, the plan said {self.mb['total']} MB "
                f"({self.mb['total'] / peak - 1:+.0%})")
        return {"optim": self.optim, "memory_plan_mb": self.mb, "peak_tensor_mb": peak,
                "peak_mem_mb": common.peak_memory_mb(self.peak.device, self.peak),
                "optimizer_state_mb": round(optimizer_state_bytes(self.optimizer) / 2**20, 2)}


class StepPeak:
    """The peak of live tensors in the largest training step, on CUDA (on a CPU `mb` stays None)."""

    def __init__(self, device, model, optimizer):
        self.device, self.model, self.optimizer, self.largest, self.measured = device, model, optimizer, 0, None
        self.run_peak = 0  # CUDA: the allocator's peak before each reset below (common.peak_memory_mb reads it)

    @property
    def mb(self):  # a property: ProfiledPeak reads its profile only when asked
        return self.measured

    def largest_yet(self, size):
        if not self.optimizer.state or size <= self.largest:
            return False
        self.largest = size
        return True

    def held(self):
        params = list(self.model.parameters())
        return (common.tensor_bytes(params) + common.tensor_bytes(list(self.model.buffers()))
                + common.tensor_bytes([p.grad for p in params if p.grad is not None])
                + optimizer_state_bytes(self.optimizer))

    @contextlib.contextmanager
    def measure(self, size):
        if self.device.type != "cuda" or not self.largest_yet(size):
            yield
            return
        held = self.held()
        torch.cuda.synchronize(self.device)
        self.run_peak = max(self.run_peak, torch.cuda.max_memory_allocated(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)
        start = torch.cuda.memory_allocated(self.device)
        yield
        torch.cuda.synchronize(self.device)
        self.measured = max(self.measured or 0,
                            round((held + torch.cuda.max_memory_allocated(self.device) - start) / 2**20, 1))


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


class ProfiledPeak(StepPeak):
    """StepPeak, measured on a CPU by the profiler (--measure-peak)."""

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
