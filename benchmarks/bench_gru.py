"""bench_gru.py -- the seed's "original vs optimized preset" table for train_gru.py, measured here.

Trains each --preset of train_gru.py (optimized: CadenceGRU, one fused GRU layer; original:
CadenceGRUMN, the ~48M-parameter 3-layer GRU-MN that steps through time in Python) on the same
batch with the trainer's own step (common.train_step) and prints a markdown table for the
README: parameters, checkpoint size, step time, training samples/s, peak memory (and peak GPU
memory on CUDA), with the ratio optimized / original.

    python benchmarks/bench_gru.py                                  # laptop CPU, ~2.5 min on 2 idle cores
    python benchmarks/bench_gru.py --repeats 1 --steps 2 --warmup 1 # quick look, under a minute
    python benchmarks/bench_gru.py --device cuda                    # GPU: adds peak GPU memory

The table goes to stdout, progress to stderr: `python benchmarks/bench_gru.py > table.md`.
Each measurement runs in a fresh subprocess (this script re-invoked with --worker PRESET, which
prints one JSON line), so one preset's peak memory never includes the other's.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil

import benchlib  # the parent side shared with bench_classifier.py (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import nonneg_int, pos_int  # noqa: E402  (the trainers' flag types)
PRESETS = ("optimized", "original")

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=pos_int, default=16, metavar="N",
                    help="micro-batch size (queries per forward/backward)")
parser.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=pos_int, default=4,
                    metavar="K", help="micro-batches per optimizer step; effective batch = N x K")
parser.add_argument("--steps", "--steps-original", dest="steps", type=pos_int, default=8, metavar="N",
                    help="timed optimizer steps for --preset original (~4 s each on 2 cores; 8 keeps "
                         "the default run under 3 minutes)")
parser.add_argument("--steps-optimized", type=pos_int, default=50, metavar="N",
                    help="timed optimizer steps for --preset optimized (it is ~100x faster, so more steps)")
parser.add_argument("--warmup", type=nonneg_int, default=2, metavar="N",
                    help="untimed optimizer steps before timing (allocator, thread pools, AdamW state)")
parser.add_argument("--repeats", type=pos_int, default=3, metavar="R",
                    help="fresh worker processes per preset, run alternately (optimized, original, ...); "
                         "the table shows median speed and max memory over them")
parser.add_argument("--dataset-size", type=pos_int, default=2000, metavar="N",
                    help="built-in queries to generate (seed 0); sets the vocabulary and the batch")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = cuda when available; CPU runs fp32, CUDA bf16 (fp16 + GradScaler "
                         "where bf16 is unsupported)")
parser.add_argument("--worker", choices=PRESETS, default=None,
                    help="internal: measure this one preset in this process and print one JSON line "
                         "(the parent run starts these)")


# -----------------------------------------------------------------------------
# worker: one preset, one fresh process

def worker(args):
    import torch
    import common
    import train_gru

    torch.manual_seed(0)  # same initial weights and dropout masks in every repeat
    choice = argparse.Namespace(device=args.device, precision="auto")
    device, amp_dtype, scaler, _ = common.setup_device(choice)  # the trainers' own choice
    precision = choice.precision + (" + GradScaler" if scaler.is_enabled() else "")

    # -- data: the same queries, vocabulary and batch for both presets
    pairs = train_gru.generate_queries(args.dataset_size, seed=0)
    itos = train_gru.build_vocab(pairs, 10000)  # train_gru's --vocab-size default
    cats = sorted({c for _, c in pairs})
    data = train_gru.pack(pairs, {w: i for i, w in enumerate(itos)}, {c: i for i, c in enumerate(cats)})
    E = args.batch_size * args.grad_accum
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:E]
    # one fixed batch for every step: step times then differ by noise only, not by query length
    # (the original preset is O(T^2) in the longest query of the batch)
    batch = train_gru.make_batch(data, idx)  # x, y (E, T); cat (E,)
    rss_base = psutil.Process().memory_info().rss / 2**20  # interpreter + torch + data, no model

    # -- model and optimizer, as train_gru.py builds them
    model = train_gru.build_model(args.worker, len(itos), len(cats)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

    # -- the steps
    def sync():  # CUDA kernels run asynchronously: time them, not their launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = args.steps_optimized if args.worker == "optimized" else args.steps
    micro_bs, times, losses = args.batch_size, [], []
    model.train()
    for i in range(args.warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss, _, micro_bs = common.train_step(model, optimizer, scaler, batch,
                                              lambda m, b: train_gru.loss_fn(m, b, device), micro_bs,
                                              1.0, device, amp_dtype,
                                              log=lambda msg: print(msg, file=sys.stderr))
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)

    # what a checkpoint holds besides small plain data: weights + AdamW's exp_avg, exp_avg_sq, step
    ckpt_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ckpt_bytes += sum(t.numel() * t.element_size() for s in optimizer.state_dict()["state"].values()
                      for t in s.values() if torch.is_tensor(t))
    step_s = statistics.median(times)
    print(json.dumps({
        "preset": args.worker, "model": type(model).__name__, "params": n_params,
        "ckpt_mb": ckpt_bytes / 2**20, "step_s": step_s, "samples_per_s": E / step_s,
        "step_times": times, "loss_first": losses[0], "loss_last": losses[-1],
        "rss_base_mb": rss_base, "peak_rss_mb": common.peak_memory_mb(torch.device("cpu")),
        "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "micro_bs": micro_bs, "vocab": len(itos), "n_cats": len(cats), "T": batch["x"].shape[1],
        **benchlib.runtime_info(device, precision)}))
    return 0


# -----------------------------------------------------------------------------
# parent: alternate presets in fresh workers, then the table

def main():
    args = parser.parse_args()
    if args.worker:
        import common
        common.run_main(lambda: worker(args))  # a common.UserError: one line, exit 2
    E = args.batch_size * args.grad_accum
    if E > args.dataset_size:
        parser.error(f"effective batch {E} (--batch-size x --grad-accum) is larger than "
                     f"--dataset-size {args.dataset_size}; raise --dataset-size")

    # the flags every worker gets: the parent's own, so the workers measure what was asked for
    flags = ["--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
             "--steps", str(args.steps), "--steps-optimized", str(args.steps_optimized),
             "--warmup", str(args.warmup), "--dataset-size", str(args.dataset_size), "--device", args.device]
    # other work on the machine slows the steps (on 2 cores, one other torch process made the
    # original's steps ~7x slower here), so the report says how much CPU others used
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {p: [] for p in PRESETS}
    n_runs = 2 * args.repeats
    for _ in range(args.repeats):
        for preset in PRESETS:  # alternating, so slow drift (thermals, neighbours) hits both alike
            t0 = time.perf_counter()
            res = benchlib.run_worker(Path(__file__).resolve(), preset, flags)
            results[preset].append(res)
            print(f"[{len(results['optimized']) + len(results['original'])}/{n_runs}] {preset:<9} "
                  f"{res['samples_per_s']:8.1f} samples/s, step {res['step_s'] * 1000:8.1f} ms, "
                  f"peak RSS {res['peak_rss_mb']:6.0f} MB, loss {res['loss_first']:.3f} -> "
                  f"{res['loss_last']:.3f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- summary over repeats: median speed, max memory
    def med(p, k):
        return statistics.median(r[k] for r in results[p])

    def mx(p, k):
        return max(r[k] for r in results[p])

    o, g = results["optimized"][0], results["original"][0]
    rows = [("model", o["model"], g["model"], ""),
            ("parameters", f"{o['params']:,}", f"{g['params']:,}", benchlib.fmt_ratio(o["params"], g["params"])),
            ("checkpoint estimate, weights + AdamW state (MB)", f"{o['ckpt_mb']:.1f}", f"{g['ckpt_mb']:.1f}",
             benchlib.fmt_ratio(o["ckpt_mb"], g["ckpt_mb"]))]
    so, sg = med("optimized", "step_s"), med("original", "step_s")
    po, pg = med("optimized", "samples_per_s"), med("original", "samples_per_s")
    rows += [("step time, median (ms)", f"{so * 1000:.1f}", f"{sg * 1000:.1f}", benchlib.fmt_ratio(so, sg)),
             ("training samples/s, median", f"{po:.1f}", f"{pg:.1f}", benchlib.fmt_ratio(po, pg))]
    mo, mg = mx("optimized", "peak_rss_mb"), mx("original", "peak_rss_mb")
    bo, bg = med("optimized", "rss_base_mb"), med("original", "rss_base_mb")
    do = max(r["peak_rss_mb"] - r["rss_base_mb"] for r in results["optimized"])
    dg = max(r["peak_rss_mb"] - r["rss_base_mb"] for r in results["original"])
    rows += [("peak RSS, max (MB)", f"{mo:.0f}", f"{mg:.0f}", benchlib.fmt_ratio(mo, mg)),
             ("RSS before the model is built (MB)", f"{bo:.0f}", f"{bg:.0f}", ""),
             ("peak RSS above that (MB)", f"{do:.0f}", f"{dg:.0f}", benchlib.fmt_ratio(do, dg))]
    if o["device"] == "cuda":
        go, gg = mx("optimized", "gpu_peak_mb"), mx("original", "gpu_peak_mb")
        rows.append(("peak GPU memory, max_memory_allocated (MB)", f"{go:.0f}", f"{gg:.0f}",
                     benchlib.fmt_ratio(go, gg)))

    # -- report
    benchlib.print_header("CADENCE GRU: optimized vs original preset", sys.argv, o, busy, others)
    print(f"workload: {args.dataset_size} built-in queries (seed 0), vocabulary {o['vocab']} words, "
          f"{o['n_cats']} categories; the same batch of {E} queries every step ({args.batch_size} x "
          f"{args.grad_accum} accumulation, {o['T']} time steps), AdamW lr 1e-3, clip 1.0; "
          f"{args.warmup} warm-up steps, then {args.steps_optimized} (optimized) / {args.steps} (original) "
          f"timed steps; {args.repeats} repeat(s) per preset, each in a fresh process, alternating\n")
    benchlib.print_table(("", "optimized", "original", "optimized / original"), rows)
    print()
    benchlib.print_per_repeat(results)
    benchlib.print_micro_bs_note(results, args.batch_size)
    print("peak RSS includes the Python + torch runtime; the row below it is what the model, its "
          "gradients, AdamW state and activations added  ")
    if max(busy, others or 0) >= 20:
        print("note: other processes shared the CPU with this run; steps that shared the cores are "
              "slower (the median over repeats damps one such repeat). For the README, re-run on an "
              "idle machine  ")
    print(f"total wall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
