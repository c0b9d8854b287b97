"""bench_gru.py -- the seed's "original vs optimized preset" table for train_gru.py, measured here.

Trains each --preset of train_gru.py (optimized: CadenceGRU, one fused GRU layer; original:
CadenceGRUMN, the ~48M-parameter 3-layer GRU-MN that steps through time in Python) on the same
batch with the trainer's own step (common.train_step) and prints a markdown table for the
README: parameters, checkpoint size, step time, training samples/s, peak memory (and peak GPU
memory on CUDA), with the ratio optimized / original.

    python benchmarks/bench_gru.py                                  # laptop CPU, ~2.5 min on 2 idle cores
    python benchmarks/bench_gru.py --repeats 1 --steps 2 --warmup 1 # quick look, under a minute
    python benchmarks/bench_gru.py --device cuda                    # GPU: adds peak GPU memory
    python benchmarks/bench_gru.py --precision compare              # fp32 vs bf16: ~6 min on 2 idle cores (estimated)
    python benchmarks/bench_gru.py --precision compare --repeats 1 --steps 2 --warmup 1   # 55 s on 2 shared cores

--precision compare runs each preset in fp32 and in bf16 autocast (fresh workers, alternating)
and prints samples/s, bf16 / fp32 and the val perplexity after the timed steps of each (256
held-out queries, train_gru.evaluate under the same autocast): the steps train one fixed batch,
so the perplexity says whether bf16 changed what was learned, not how good a trained model is.

The table goes to stdout, progress to stderr: `python benchmarks/bench_gru.py > table.md`.
Each measurement runs in a fresh subprocess (this script re-invoked with --worker PRESET, which
prints one JSON line), so one preset's peak memory never includes the other's.

Real categorized text (issue 13): one-line Debian package descriptions from this machine's apt
index (benchlib.debian_descriptions), lower-cased, stand in for queries and their section for the
category. --real trains the real train_gru.py twice with its defaults (no tuning flags), once with
the sections as categories and once category-blind (the same rows, one category "all" for all,
so the split and vocabulary are the same), and prints val perplexity and wall time side by side:

    python benchmarks/bench_gru.py --make-data data/debian_gru   # writes queries.csv, queries_blind.csv
    python benchmarks/bench_gru.py --real data/debian_gru        # 5.6 min on 2 shared cores; makes the data if missing
    python train_gru.py --data data/debian_gru/queries.csv --out runs/debian   # the same run by hand
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
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
parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "compare"], default="auto",
                    help="auto = the --device default above (fp32 on CPU); bf16 = bf16 autocast for "
                         "both presets; compare = each preset in fp32 and in bf16, alternating, and a "
                         "bf16 vs fp32 table with val perplexity")
g = parser.add_argument_group("real categorized text (the speed flags above do not apply)")
g.add_argument("--make-data", default=None, metavar="DIR",
               help="write DIR/queries.csv (text,category = description,section) and DIR/queries_blind.csv "
                    "(the same texts, category 'all') from the apt index, then exit")
g.add_argument("--real", default=None, metavar="DIR",
               help="train train_gru.py (its defaults) on DIR/queries.csv and DIR/queries_blind.csv "
                    "(written first if missing) and print the category-conditioned vs blind table")
g.add_argument("--per-section", type=pos_int, default=400, metavar="N",
               help="--make-data: descriptions per section (8 sections: %s)" % ", ".join(benchlib.SECTIONS))
g.add_argument("--seeds", type=nonneg_int, nargs="+", default=[1337], metavar="S",
               help="--real: train_gru.py --seed values (each changes the split and the initial "
                    "weights); every seed trains both models, the table shows the mean")
g.add_argument("--train-args", default="", metavar="FLAGS",
               help="--real: extra train_gru.py flags for both runs, e.g. \"--lr 1e-3 --epochs 3\" "
                    "(the seed's values); the default table uses none")
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
    choice = argparse.Namespace(device=args.device, precision=args.precision)  # compare's workers get fp32/bf16
    device, amp_dtype, scaler, _ = common.setup_device(choice)  # the trainers' own choice
    precision = choice.precision + (" + GradScaler" if scaler.is_enabled() else "")

    # -- data: the same queries, vocabulary and batch for both presets
    pairs = train_gru.generate_queries(args.dataset_size, seed=0)
    itos = train_gru.build_vocab(pairs, 10000)  # train_gru's --vocab-size default
    cats = sorted({c for _, c in pairs})
    stoi, cat_index = {w: i for i, w in enumerate(itos)}, {c: i for i, c in enumerate(cats)}
    data = train_gru.pack(pairs, stoi, cat_index)
    E = args.batch_size * args.grad_accum
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    idx = perm[:E]
    # held-out queries (not the training batch) for the val perplexity of a --precision run
    val_data = train_gru.pack([pairs[i] for i in perm[E:E + 256].tolist()], stoi, cat_index)
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
                                              clip=1.0, device=device, amp_dtype=amp_dtype,
                                              log=lambda msg: print(msg, file=sys.stderr))
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)

    val_ppl = None
    if args.precision != "auto":  # only a --precision run reports it: the default table and its time stay
        val_ppl = train_gru.evaluate(model, val_data, device, amp_dtype)[1]

    # what a checkpoint holds besides small plain data: weights + AdamW's exp_avg, exp_avg_sq, step
    ckpt_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    ckpt_bytes += sum(t.numel() * t.element_size() for s in optimizer.state_dict()["state"].values()
                      for t in s.values() if torch.is_tensor(t))
    step_s = statistics.median(times)
    print(json.dumps({
        "preset": args.worker, "model": type(model).__name__, "params": n_params,
        "ckpt_mb": ckpt_bytes / 2**20, "step_s": step_s, "samples_per_s": E / step_s,
        "step_times": times, "loss_first": losses[0], "loss_last": losses[-1], "val_ppl": val_ppl,
        "rss_base_mb": rss_base, "peak_rss_mb": common.peak_memory_mb(torch.device("cpu")),
        "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "micro_bs": micro_bs, "vocab": len(itos), "n_cats": len(cats), "T": batch["x"].shape[1],
        **benchlib.runtime_info(device, precision)}))
    return 0


# -----------------------------------------------------------------------------
# real text: conditioned vs blind, the real trainer with its defaults

def make_data(folder, per_section):
    """Write the two CSVs train_gru.py --data reads; returns their paths."""
    rows = benchlib.debian_descriptions(per_section=per_section)  # [(description, section)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "queries.csv", folder / "queries_blind.csv"
    for path, blind in zip(paths, (False, True)):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "category"])
            # lower-cased like a typed query; train_gru.py lower-cases anyway, the file shows what it sees
            w.writerows((" ".join(d.lower().split()), "all" if blind else s) for d, s in rows)
    print(f"wrote {paths[0]} and {paths[1]}: {len(rows)} descriptions, {len(benchlib.SECTIONS)} sections "
          f"x {per_section}", file=sys.stderr)
    return paths


def train_once(csv_path, seed, extra, workdir):
    """Run train_gru.py on csv_path in a fresh folder of workdir and return its summary.json. The
    cwd is that folder, so no optimal_config.json of the caller's is read: its defaults, as shipped."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    cmd = [sys.executable, str(REPO / "train_gru.py"), "--data", str(Path(csv_path).resolve()),
           "--seed", str(seed), "--out", "run", *extra]
    proc = subprocess.run(cmd, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        print(f"error: train_gru.py on {csv_path} failed (exit {proc.returncode}); its output is above",
              file=sys.stderr)
        sys.exit(proc.returncode or 1)
    return json.loads((out / "run" / "summary.json").read_text())


def real(args):
    import shlex
    folder = Path(args.real)
    paths = folder / "queries.csv", folder / "queries_blind.csv"
    if not all(p.exists() for p in paths):
        paths = make_data(folder, args.per_section)
    extra = shlex.split(args.train_args)
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {"conditioned": [], "blind": []}
    with tempfile.TemporaryDirectory() as work:
        for seed in args.seeds:
            for name, path in zip(results, paths):  # alternating, so drift hits both alike
                s = train_once(path, seed, extra, work)
                results[name].append(s)
                print(f"seed {seed} {name:<11} val ppl {s['value']:8.2f} (best {s['best_value']:.2f}, "
                      f"unigram {s['unigram_ppl']:.2f}), {s['steps']} steps, {s['wall_s']:.0f} s",
                      file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    def mean(name, key):
        return statistics.mean(s[key] for s in results[name])

    rows = []
    for label, key, fmt in [("val perplexity, end of training", "value", "{:.1f}"),
                            ("val perplexity, best evaluation", "best_value", "{:.1f}"),
                            ("unigram baseline perplexity (no context, no category)", "unigram_ppl", "{:.1f}"),
                            ("wall time (s)", "wall_s", "{:.0f}"),
                            ("training samples/s", "samples_per_s", "{:.0f}")]:
        c, b = mean("conditioned", key), mean("blind", key)
        rows.append((label, fmt.format(c), fmt.format(b), benchlib.fmt_ratio(c, b)))
    c0 = results["conditioned"][0]
    rows += [("optimizer steps", str(c0["steps"]), str(results["blind"][0]["steps"]), ""),
             ("parameters", f"{c0['params']:,}", f"{results['blind'][0]['params']:,}", "")]

    import torch  # only now: the parent stays light while the trainers run
    res = benchlib.runtime_info(torch.device(c0["device"]), c0["precision"])
    benchlib.print_header("CADENCE GRU: category-conditioned vs category-blind on real text",
                          sys.argv, res, busy, others)
    n = sum(1 for _ in open(paths[0])) - 1
    print(f"workload: {n} one-line Debian package descriptions (lower-cased) from {benchlib.APT_LISTS}, "
          f"{len(benchlib.SECTIONS)} sections ({', '.join(benchlib.SECTIONS)}); conditioned: the section is "
          f"the category; blind: one category for every row (same texts, same split and vocabulary); "
          f"train_gru.py defaults" + (f" + `{args.train_args}`" if extra else ", no tuning flags")
          + f"; seed(s) {', '.join(map(str, args.seeds))}, mean shown\n")
    benchlib.print_table(("", "conditioned", "blind", "conditioned / blind"), rows)
    print()
    for name, runs in results.items():
        per = ", ".join(f"{s['value']:.1f}" for s in runs)
        print(f"{name} val perplexity per seed: {per}  ")
    benchlib.print_footer(busy, others, wall)
    return 0


# -----------------------------------------------------------------------------
# parent: alternate presets in fresh workers, then the table

def print_progress(done, n_runs, label, res, seconds):
    """One worker's result on stderr as it finishes."""
    ppl = f", val ppl {res['val_ppl']:.1f}" if res["val_ppl"] is not None else ""
    print(f"[{done}/{n_runs}] {label:<14} {res['samples_per_s']:8.1f} samples/s, step {res['step_s'] * 1000:8.1f} "
          f"ms, peak RSS {res['peak_rss_mb']:6.0f} MB, loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}"
          f"{ppl} ({seconds:.0f} s)", file=sys.stderr, flush=True)


def compare(args, flags):
    """--precision compare: each preset in fp32 and in bf16 autocast, each run in a fresh worker,
    the two precisions alternating run by run; then the bf16 vs fp32 table."""
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {p: {prec: [] for prec in benchlib.PRECISIONS} for p in PRESETS}
    n_runs, done = 2 * len(PRESETS) * args.repeats, 0
    for repeat in range(args.repeats):
        for preset in PRESETS:
            for prec in benchlib.precision_order(repeat):
                t0 = time.perf_counter()
                res = benchlib.run_worker(Path(__file__).resolve(), preset, flags + ["--precision", prec])
                results[preset][prec].append(res)
                done += 1
                print_progress(done, n_runs, f"{preset} {prec}", res, time.perf_counter() - t0)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    o = results["optimized"]["fp32"][0]
    benchlib.print_header("CADENCE GRU: fp32 vs bf16 autocast", sys.argv,
                          dict(o, precision="fp32 vs bf16 autocast"), busy, others)
    print(f"workload: as the optimized vs original table (`python benchmarks/bench_gru.py`): the same batch of "
          f"{args.batch_size * args.grad_accum} queries every step ({o['T']} time steps), {args.warmup} warm-up "
          f"steps, then {args.steps_optimized} (optimized) / {args.steps} (original) timed steps; then val "
          f"perplexity on 256 held-out queries. bf16 = common.train_step and train_gru.evaluate under bf16 "
          f"autocast, weights and AdamW in fp32. {args.repeats} repeat(s) per preset and precision, each in a "
          f"fresh process, fp32 and bf16 alternating; medians shown\n")
    benchlib.print_precision_table("preset", results, "val perplexity", "val_ppl", "{:.1f}".format)
    benchlib.print_micro_bs_note({f"{p} {prec}": runs for p in PRESETS for prec, runs in results[p].items()},
                                 args.batch_size)
    benchlib.print_footer(busy, others, wall)
    return 0


def main():
    args = parser.parse_args()
    if args.worker:
        import common
        common.run_main(lambda: worker(args))  # a common.UserError: one line, exit 2
    if args.make_data and args.real:
        print("error: --make-data and --real: pick one (--real writes the data itself when it is missing)",
              file=sys.stderr)
        return 2
    if args.make_data:
        make_data(args.make_data, args.per_section)
        return 0
    if args.real:
        return real(args)
    E = args.batch_size * args.grad_accum
    if E > args.dataset_size:
        parser.error(f"effective batch {E} (--batch-size x --grad-accum) is larger than "
                     f"--dataset-size {args.dataset_size}; raise --dataset-size")
    if args.precision != "auto" and E + 256 > args.dataset_size:
        parser.error(f"--precision {args.precision} holds out 256 queries beside the batch of {E}: "
                     f"--dataset-size {args.dataset_size} is too small; raise it")

    # the flags every worker gets: the parent's own, so the workers measure what was asked for
    flags = ["--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
             "--steps", str(args.steps), "--steps-optimized", str(args.steps_optimized),
             "--warmup", str(args.warmup), "--dataset-size", str(args.dataset_size), "--device", args.device]
    if args.precision == "compare":
        return compare(args, flags)
    flags += ["--precision", args.precision]
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
            print_progress(len(results["optimized"]) + len(results["original"]), n_runs, preset, res,
                           time.perf_counter() - t0)
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
    if o["val_ppl"] is not None:  # --precision fp32 or bf16
        vo, vg = med("optimized", "val_ppl"), med("original", "val_ppl")
        rows.append(("val perplexity after the timed steps, 256 held-out queries", f"{vo:.1f}", f"{vg:.1f}",
                     benchlib.fmt_ratio(vo, vg)))
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
