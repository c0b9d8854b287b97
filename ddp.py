"""ddp.py -- several processes under torchrun (DDP: gloo on a CPU, NCCL on CUDA, gloo on Windows).

Imported only when torchrun starts the trainer (WORLD_SIZE > 1, common.process_group); a plain
run uses common.OneProcess, whose methods are the same and do nothing.

How it works: every trainer runs the same under `torchrun --nproc_per_node N train_X.py ...`.
--batch-size is each process's effective batch, so the global batch is N times it. The global
batch's items stay a pure function of (seed, step) and rank r trains on its slice (`slice`), so
N processes follow the 1-process run at the same global batch, and a resume is exact. Gradients
are averaged over the ranks once per optimizer step: every micro-batch but the last runs inside
DDP's no_sync (common.train_step). Rank 0 alone writes the run folder; the others log nothing
and keep a status dict nobody writes. Anything that decides the loop's course (the logged loss,
a micro-batch halved after an out-of-memory error, a stop request, the best metric) is agreed
through `all`, so every rank takes the same branch.
"""
import os
import time

import torch
import torch.distributed as dist

import common


class Ranks:
    """This process's place in the torchrun group (rank, world, local_rank) and what the ranks
    must agree on. common.OneProcess has the same methods for a plain run."""

    def __init__(self, args):
        self.world = int(os.environ["WORLD_SIZE"])  # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main, self.device = self.rank == 0, None
        if args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)  # before common.setup_device: "cuda" is this rank's GPU

    def start(self, out, args, trainer, metric_name, notes, device):
        """common.start_run on rank 0; on the others a silent log, a status dict nobody writes and
        the stop handlers (they still stop cleanly on torchrun's SIGTERM). Then the process group."""
        if self.is_main:
            log, status, stop = common.start_run(out, args, trainer, metric_name, notes)
        else:
            log, status, stop = (lambda msg: None), {"started": time.time()}, common.install_stop_handlers()
        self.device = device
        # NCCL is not built into torch on Windows (nor on macOS): there gloo, which also reduces
        # CUDA tensors, only slower. Ask torch whether NCCL is there rather than guess from the OS.
        dist.init_process_group("nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo")
        return log, status, stop

    def end(self):
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, model):
        """(the model that trains, its no_sync for common.train_step). Save the unwrapped model."""
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        return ddp, ddp.no_sync

    def all(self, value, op):
        """A number agreed by every rank: op is "sum", "min" or "max"."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
        return t.item()

    def agree_batch(self, micro_bs, accum):
        """Each rank's probe may fit another micro-batch (another GPU's free memory): all take the
        smallest micro-batch and the largest accumulation, so the global batch has one size."""
        return int(self.all(micro_bs, "min")), int(self.all(accum, "max"))

    def barrier(self):
        """No rank runs ahead of rank 0 writing a checkpoint."""
        dist.barrier()

    def seed_step(self, seed, step):
        """Reseed this rank's torch RNG (dropout, augmentation) from (seed, step, rank) before each
        step: the ranks must not draw the same masks, and a checkpoint holds one RNG state (rank
        0's), so a resumed rank could not go on with its own stream. With dropout, N processes
        follow one process in distribution, not number for number."""
        torch.manual_seed((seed * 1_000_003 + step) * self.world + self.rank)

    def slice(self, items):
        """This rank's contiguous share of the global batch's items (a 1-D index tensor or a list),
        as equal as they divide; empty when there are fewer items than ranks."""
        n = len(items)
        return items[self.rank * n // self.world:(self.rank + 1) * n // self.world]
