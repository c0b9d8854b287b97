"""bench_lm.py -- train_lm.py measured against a plain nanoGPT-style loop, GPT vs eigen at long
context, and model-FLOPs utilisation against this machine's measured matmul peak.

    python benchmarks/bench_lm.py             # ~6 min on 2 idle cores
    python benchmarks/bench_lm.py --quick     # smoke run, ~1.5 min
    python benchmarks/bench_lm.py --device cuda

Three tables, each measurement in a fresh worker process (this script re-invoked with --worker,
printing one JSON line), so one run's peak memory never includes another's:

 1. ours vs naive, same model shape, data, batch, initial weights, schedule and steps:
    "ours" is train_lm.py's LM (one fused qkv Linear, F.scaled_dot_product_attention)
    stepped by common.train_step (what the trainer runs); "naive" is written below in the plain
    nanoGPT-tutorial way: separate q/k/v Linears, attention as softmax(masked_fill(q k^T)) @ v
    with the (T, T) matrix materialised, loss.item() every step, zero_grad(). Both: exact GELU,
    AdamW (betas 0.9/0.95, wd 0.1 on 2-D weights), clip 1.0, warmup + cosine, fp32 on CPU.
 2. GPT vs eigen at T = 1K..32K, batch 1, the tiny width: time per training step and peak memory.
 3. MFU of every run in 1 and 2 against the fp32 matmul peak measured here (CPU) or the datasheet.
 4. train_sft.py, the seed's standard column vs --resource-efficient on the same model (the tiny
    preset, built-in pairs, 64 pairs per step either way): train_sft.py itself in a subprocess;
    peak RSS (CPU) or max allocated (GPU) from its summary.json, tokens/s from its log records;
    a middle column runs the standard settings with only the mode's allocator setting; and the
    tensors' own peak for one micro-batch of each, counted in this process (tensor_peak_mb).

    python benchmarks/bench_lm.py --sft-only  # table 4 alone, ~4 min

With --nanogpt DIR (a checkout of github.com/karpathy/nanoGPT; nothing of it is copied here) it
prints one other table instead: train_lm.py against nanoGPT's own train.py, unmodified.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt
    OMP_NUM_THREADS=1 python benchmarks/bench_lm.py --nanogpt /tmp/nanogpt --steps-a 400 --steps-b 30 --repeats 2

 5. Both shapes (A, B above), every run a fresh process started from this script, in turn
    (ours fp32, nanoGPT, ours default; again per --repeats), OMP_NUM_THREADS=--threads, same
    steps, compile off, dropout 0. nanoGPT: config/train_shakespeare_char.py's recipe, fp32 on
    the CPU, reading the same train.bin / val.bin (bench_lm_nanogpt.prepare_data). Ours:
    train_lm.py at --precision fp32, and at its default (auto: bf16 where this CPU has bf16 units
    and the model's own step is measured faster in it, common.measure_precision).
    tokens/s leaves start-up out, for both alike, from each run's own per-step timings: ours'
    metrics.jsonl (ms per step over each --log-every interval), nanoGPT's log (`iter N: ... time
    Xms`, every iteration), grouped into the same intervals; the first interval (warm-up; for
    nanoGPT also its step-0 evaluation) and nanoGPT's last iteration (its evaluation and save) are
    dropped; the median interval's tokens/s, then the median over repeats.
    peak RSS: the process's high-water mark (os.wait4's ru_maxrss), start-up and the end included.
    val loss: each final checkpoint (first repeat) scored here on the whole of val.bin in
    non-overlapping windows of the context, summed cross-entropy / tokens, fp32
    (bench_lm_nanogpt.val_nats), the same for both. The measured table, and a profile of where
    our fp32 step's time goes (mostly the same ATen kernels nanoGPT runs), are in docs/lm.md.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import psutil

import benchlib  # the parent side shared with bench_gru.py and bench_classifier.py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import nonneg_int, pos_int  # noqa: E402  (the trainers' flag types)

SHAPES = {  # name: (layers, heads, width, context, batch)
    "A": (4, 4, 128, 64, 12),     # the first target: >= 1.2x tokens/s of the naive loop
    "B": (6, 6, 384, 256, 8),     # the second: parity, and MFU against the measured peak
}

LONG = (4, 4, 128)  # table 2: layers, heads, width (the tiny preset's)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--steps-a", type=pos_int, default=200, metavar="N", help="timed steps, shape A")
parser.add_argument("--steps-b", type=pos_int, default=12, metavar="N", help="timed steps, shape B")
parser.add_argument("--warmup", type=nonneg_int, default=3, metavar="N", help="untimed steps first")
parser.add_argument("--repeats", type=pos_int, default=2, metavar="R",
                    help="fresh worker processes per (loop, shape), run alternately; median speed, max memory")
parser.add_argument("--contexts", default="1024,4096,16384,32768", metavar="T,T,...",
                    help="context lengths for table 2")
parser.add_argument("--gpt-max-context", type=pos_int, default=16384, metavar="T",
                    help="table 2: GPT is skipped above this context (its attention time grows as T^2)")
parser.add_argument("--sft-steps", type=nonneg_int, default=20, metavar="N",
                    help="table 4: optimizer steps per sft run (0 = skip the table)")
parser.add_argument("--sft-only", action="store_true", help="only table 4")
parser.add_argument("--nanogpt", default=None, metavar="DIR",
                    help="a nanoGPT checkout: print table 5 (train_lm.py vs nanoGPT's train.py, shapes A and B, "
                         "--steps-a / --steps-b steps each run) instead of tables 1-4")
parser.add_argument("--threads", type=pos_int, default=1, metavar="N", help="table 5: OMP_NUM_THREADS of every run")
parser.add_argument("--quick", action="store_true", help="smoke run: fewer steps, 1 repeat, contexts 1K and 4K")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
parser.add_argument("--worker", choices=["ours", "naive", "long", "peak"], default=None,
                    help="internal: one measurement in this process, one JSON line (the parent starts these)")
parser.add_argument("--shape", default=None, help="internal: worker shape, layers,heads,width,context,batch")
parser.add_argument("--arch", default="gpt", help="internal: table-2 worker architecture")
parser.add_argument("--steps", type=pos_int, default=10, help="internal: worker timed steps")


# -----------------------------------------------------------------------------
# the naive loop's model: the plain way, written for this benchmark

def naive_gpt(vocab, L, H, d, T):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.proj = nn.Linear(d, d)
            self.register_buffer("mask", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

        def forward(self, x):
            B, t, C = x.shape
            q, k, v = (m(x).view(B, t, H, C // H).transpose(1, 2) for m in (self.q, self.k, self.v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // H))  # (B, H, T, T) materialised
            att = att.masked_fill(self.mask[:, :, :t, :t] == 0, float("-inf")).softmax(-1)
            return self.proj((att @ v).transpose(1, 2).contiguous().view(B, t, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2, self.attn = nn.LayerNorm(d), nn.LayerNorm(d), Attention()
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
            self.blocks = nn.Sequential(*[Block() for _ in range(L)])
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
            self.head.weight = self.wte.weight
            for name, p in self.named_parameters():  # GPT-2 init, as ours
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
            logits = self.head(self.ln_f(self.blocks(x)))
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    return GPT()


# -----------------------------------------------------------------------------
# workers

def data_dir(log):
    import os
    import train_lm
    os.chdir(REPO)  # the built-in corpus lives in <repo>/data/pydoc, packed on first use
    return train_lm.builtin_corpus(log)


def worker(args):
    import torch
    import common
    import train_lm

    choice = argparse.Namespace(device=args.device, precision="auto")
    device, amp_dtype, scaler, _ = common.setup_device(choice)
    info = benchlib.runtime_info(device, choice.precision)
    if args.worker == "peak":
        import tempfile
        if device.type == "cpu":  # as memory_optimizer.py profile measures it (train_lm.py reads that)
            flops = train_lm.matmul_peak(device, torch.float32, seconds=3.0)
            why = f"measured fp32 matmul peak, {flops / 1e9:.0f} GFLOP/s (256..1024 square, best of 3 s)"
        else:
            flops, why = train_lm.device_peak(device, amp_dtype, "optimal_config.json", tempfile.mkdtemp())
        print(json.dumps(dict(info, peak_flops=flops, why=why)))
        return 0

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    L, H, d, T, B = map(int, args.shape.split(","))
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    ddir = data_dir(log)
    meta = train_lm.load_meta(ddir, T)
    rss_base = psutil.Process().memory_info().rss / 2**20
    torch.manual_seed(0)
    cfg = dict(arch=args.arch, vocab_size=meta["vocab_size"], n_layer=L, n_head=H, d_model=d, seq_len=T,
               num_eigenstates=32, chunk_size=64)
    fpt = train_lm.flops_per_token(cfg)
    if args.worker == "naive":
        model = naive_gpt(meta["vocab_size"], L, H, d, T).to(device)
    else:
        model = train_lm.LM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), fused=device.type == "cuda")
    total = args.warmup + args.steps
    warm = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))))
    times, losses = [], []
    model.train()
    for step in range(total):
        batch = train_lm.get_batch(ddir / "train.bin", meta["train_tokens"], T, 0, step, B, 0, B)
        sync()
        t0 = time.perf_counter()
        if args.worker == "naive":  # the plain loop, as the nanoGPT tutorial writes it
            x = batch["x"].to(device)
            with common.autocast(device, amp_dtype):
                loss = model(x[:, :-1], x[:, 1:])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            loss = loss.item()  # every step: a device sync on CUDA
        else:  # what train_lm.py runs
            loss, _, _ = common.train_step(model, opt, scaler, batch, lambda m, b: train_lm.loss_fn(m, b, device),
                                           B, clip=1.0, device=device, amp_dtype=amp_dtype, log=log)
        sched.step()
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    # validation loss after the same steps, on the same fixed windows, computed the same way
    windows = train_lm.val_windows(ddir / "val.bin", meta["val_tokens"], T, 32768 if T <= 256 else T)
    model.eval()
    total_loss, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), 16):
            x = windows[i:i + 16].to(device)
            with common.autocast(device, amp_dtype):
                if args.worker == "naive":
                    total_loss += model(x[:, :-1], x[:, 1:]).float().item() * x[:, 1:].numel()
                else:
                    total_loss += train_lm.loss_fn(model, {"x": x}, device)[0].item()
            n += x[:, 1:].numel()
    step_s = statistics.median(times)
    print(json.dumps(dict(info, loop=args.worker, arch=args.arch, shape=args.shape, params=n_params,
                          step_s=step_s, tokens_per_s=B * T / step_s, flops_per_token=fpt,
                          loss_first=losses[0], loss_last=losses[-1], val_loss=total_loss / n,
                          rss_base_mb=rss_base, peak_rss_mb=common.peak_memory_mb(torch.device("cpu")),
                          gpu_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                          steps=args.steps)))
    return 0


# -----------------------------------------------------------------------------
# parent

def main():
    args = parser.parse_args()
    if args.worker:
        import common
        common.run_main(lambda: worker(args))
    if args.quick:
        args.steps_a, args.steps_b, args.repeats, args.warmup = 40, 3, 1, 2
        args.contexts = "1024,4096"
    try:
        contexts = [int(t) for t in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts {args.contexts}: give comma-separated integers")
    script = Path(__file__).resolve()
    dev = ["--device", args.device, "--warmup", str(args.warmup)]

    def mem(r):  # what the run added above the runtime + data: GPU max allocated, else peak RSS
        return r["gpu_peak_mb"] if r["gpu_peak_mb"] is not None else r["peak_rss_mb"] - r["rss_base_mb"]

    busy, t_start, kids0 = benchlib.cpu_watch_start()
    if args.nanogpt:
        return versus_nanogpt(args, busy, t_start, kids0)
    if args.sft_only:
        sft = sft_modes(args)
        wall, others = benchlib.cpu_watch_end(t_start, kids0)
        benchlib.print_header("train_sft.py: standard vs --resource-efficient", sys.argv,
                              {"torch": sft["standard"][0]["torch"], "threads": sft["standard"][0]["threads"],
                               "device": sft["standard"][0]["device"], "precision": "auto"}, busy, others)
        print_sft(args, sft)
        benchlib.print_footer(busy, others, wall)
        return 0
    peak = benchlib.run_worker(script, "peak", dev)

    # -- 1. ours vs naive
    res = {}
    for shape, (L, H, d, T, B) in SHAPES.items():
        steps = args.steps_a if shape == "A" else args.steps_b
        for _ in range(args.repeats):
            for loop in ("ours", "naive"):  # alternating: drift and neighbours hit both alike
                r = benchlib.run_worker(script, loop, [*dev, "--shape", f"{L},{H},{d},{T},{B}", "--steps", str(steps)])
                res.setdefault((shape, loop), []).append(r)
                print(f"{shape} {loop:<5} {r['tokens_per_s']:8.0f} tokens/s, step {r['step_s'] * 1000:7.1f} ms, "
                      f"+{mem(r):5.0f} MB, val loss {r['val_loss']:.4f}", file=sys.stderr, flush=True)

    # -- 2. GPT vs eigen at long context
    long = {}
    for T in contexts:
        for arch in ("gpt", "eigen"):
            if arch == "gpt" and T > args.gpt_max_context:
                long[(arch, T)] = None
                continue
            r = benchlib.run_worker(script, "long", [*dev, "--shape", f"{LONG[0]},{LONG[1]},{LONG[2]},{T},1", "--arch", arch,
                                                     "--steps", "2" if T >= 16384 else "3", "--warmup", "1"])
            long[(arch, T)] = r
            print(f"T {T:>6} {arch:<5} step {r['step_s'] * 1000:9.1f} ms, +{mem(r):6.0f} MB", file=sys.stderr, flush=True)
    # the peak again at the end: a neighbour busy during one measurement lowers it, so the
    # higher of the two is the better estimate of what this machine can do
    peak2 = benchlib.run_worker(script, "peak", dev)
    peak = max(peak, peak2, key=lambda r: r["peak_flops"])
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- report
    first = res[("A", "ours")][0]
    benchlib.print_header("train_lm.py: ours vs a naive loop, GPT vs eigen, MFU", sys.argv, first, busy, others)
    print(f"peak for MFU: {peak['why']}  ")
    print(f"workload: built-in corpus (pydoc_data.topics, bytes), the same windows (seed 0) and initial weights "
          f"for both loops; {args.warmup} warm-up steps, then {args.steps_a} (A) / {args.steps_b} (B) timed steps; "
          f"{args.repeats} repeat(s) per loop, fresh processes, alternating; median speed, max memory\n")

    def med(k, key):
        return statistics.median(r[key] for r in res[k])

    for shape, (L, H, d, T, B) in SHAPES.items():
        o, n = res[(shape, "ours")], res[(shape, "naive")]
        mo, mn = max(mem(r) for r in o), max(mem(r) for r in n)
        to, tn = med((shape, "ours"), "tokens_per_s"), med((shape, "naive"), "tokens_per_s")
        fo = o[0]["flops_per_token"]
        rows = [("parameters", f"{o[0]['params']:,}", f"{n[0]['params']:,}", ""),
                ("step time, median (ms)", f"{1000 * med((shape, 'ours'), 'step_s'):.1f}",
                 f"{1000 * med((shape, 'naive'), 'step_s'):.1f}", ""),
                ("tokens/s, median", f"{to:,.0f}", f"{tn:,.0f}", benchlib.fmt_ratio(to, tn)),
                ("peak memory above runtime + data, max (MB)", f"{mo:.0f}", f"{mn:.0f}", benchlib.fmt_ratio(mo, mn)),
                (f"val loss after {o[0]['steps'] + args.warmup} steps (nats/token)", f"{o[0]['val_loss']:.4f}",
                 f"{n[0]['val_loss']:.4f}", ""),
                ("MFU (model FLOPs / peak)", f"{100 * fo * to / peak['peak_flops']:.1f}%",
                 f"{100 * fo * tn / peak['peak_flops']:.1f}%", "")]
        print(f"**{shape}: {L} layers, {H} heads, width {d}, context {T}, batch {B}** "
              f"({fo / 1e6:.2f} M FLOPs/token)\n")
        benchlib.print_table(("", "ours", "naive", "ours / naive"), rows)
        print()
        for loop, runs in (("ours", o), ("naive", n)):
            per = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in runs)
            print(f"{shape} {loop} tokens/s per repeat: {per}  ")
        print()

    print(f"**GPT vs eigen, batch 1, {LONG[0]} layers, width {LONG[2]} (GPT {LONG[1]} heads; eigen 32 eigenstates "
          f"x 2 cells, chunk 64)**\n")
    rows = []
    for T in contexts:
        g, e = long[("gpt", T)], long[("eigen", T)]
        rows.append((f"{T:,}",
                     f"{1000 * g['step_s']:,.0f}" if g else "skipped", f"{mem(g):,.0f}" if g else "skipped",
                     f"{100 * g['flops_per_token'] * g['tokens_per_s'] / peak['peak_flops']:.1f}%" if g else "",
                     f"{1000 * e['step_s']:,.0f}", f"{mem(e):,.0f}",
                     f"{100 * e['flops_per_token'] * e['tokens_per_s'] / peak['peak_flops']:.1f}%"))
    benchlib.print_table(("context T", "GPT ms/step", "GPT MB", "GPT MFU", "eigen ms/step", "eigen MB", "eigen MFU"),
                         rows)
    print()
    if 4096 in contexts and contexts[-1] > 4096:
        e4, eT = long[("eigen", 4096)], long[("eigen", contexts[-1])]
        print(f"eigen {contexts[-1]:,} vs 4,096: time x{eT['step_s'] / e4['step_s']:.1f}, memory "
              f"x{mem(eT) / mem(e4):.1f} (linear: x{contexts[-1] / 4096:g})  ")
    if any(v is None for v in long.values()):
        print(f"GPT skipped above {args.gpt_max_context:,} tokens: attention time grows as T^2 "
              f"(--gpt-max-context to include it)  ")
    if args.sft_steps:
        print_sft(args, sft_modes(args))
    benchlib.print_footer(busy, others, wall)
    return 0


# -----------------------------------------------------------------------------
# table 5: train_lm.py vs nanoGPT's train.py

def run_child(cmd, cwd, env, log_path):
    """Run cmd to the end, its output into log_path; returns its peak RSS in MB (None where
    os.wait4 is missing: Windows). Exits 2 with the log's tail if it fails."""
    import os
    import subprocess
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if hasattr(os, "wait4"):
            _, status, usage = os.wait4(proc.pid, 0)
            rc, rss = os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024  # KB on Linux
        else:
            rc, rss = proc.wait(), None
    if rc != 0:
        print(Path(log_path).read_text()[-3000:], file=sys.stderr)
        sys.exit(f"error: {' '.join(map(str, cmd[:3]))} ... exited {rc}; its log is above ({log_path})")
    return rss


def interval_ms(per_step, every):
    """Median ms per step over intervals of `every` steps, the first interval dropped.
    per_step: [(steps, ms per step)], one entry per logged interval or iteration."""
    chunks, cur = [], []
    for n, ms in per_step:
        cur += [ms] * n
        if len(cur) >= every:
            chunks.append(sum(cur) / len(cur))
            cur = []
    return statistics.median(chunks[1:] or chunks)


def versus_nanogpt(args, busy, t_start, kids0):
    """Table 5 (see the docstring): runs, scoring and the table."""
    import os
    import re
    import shutil
    import tempfile
    import bench_lm_nanogpt as bn
    import torch
    import train_lm
    ng = bn.checkout(args.nanogpt)
    work = Path(tempfile.mkdtemp(prefix="bench_lm-nanogpt-"))
    data, meta, ngdata = bn.prepare_data(work)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device.replace("auto", "cuda")
    runs = {"ours fp32": ["--precision", "fp32"], "nanoGPT": None, "ours default": []}
    res = {}
    for shape, (L, H, d, T, B) in SHAPES.items():
        steps = args.steps_a if shape == "A" else args.steps_b
        every = max(1, steps // 20)
        for rep in range(args.repeats):
            for name, flags in runs.items():
                out = work / f"{shape}-{name.replace(' ', '_')}-{rep}"
                if flags is None:
                    cmd = bn.nanogpt_cmd(ngdata, out, device, steps, (L, H, d, T, B), 1)
                    cwd = ng
                else:
                    cmd = [sys.executable, str(REPO / "train_lm.py"), "--n-layer", str(L), "--n-head", str(H),
                           "--d-model", str(d), "--seq-len", str(T), "--batch-size", str(B), "--grad-accum", "1",
                           "--max-steps", str(steps), *flags, "--data", str(data), "--device", device,
                           "--eval-every", "0", "--save-every", str(steps), "--log-every", str(every),
                           "--no-resume", "--out", str(out)]
                    cwd = work  # no optimal_config.json there
                rss = run_child(cmd, cwd, env, out.with_suffix(".log"))
                if flags is None:  # "iter N: loss X, time Yms": iteration 0 holds its first eval, N its last + save
                    its = re.findall(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", out.with_suffix(".log").read_text(),
                                     re.M)
                    per_step, precision = [(1, float(ms)) for i, ms in its if 0 < int(i) < steps], "fp32"
                else:
                    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
                    recs = [r for r in recs if "ms_per_step" in r]
                    per_step = [(r["step"] - p, r["ms_per_step"]) for p, r in zip([0] + [r["step"] for r in recs], recs)]
                    precision = json.loads((out / "args.json").read_text())["chosen"]["precision"]
                ms = interval_ms(per_step, every)
                r = dict(tokens_per_s=1000 * B * T / ms, rss=rss, precision=precision, out=out)
                res.setdefault((shape, name), []).append(r)
                print(f"{shape} {name:<12} {precision} {r['tokens_per_s']:8.0f} tokens/s, peak RSS {rss or 0:6.0f} MB",
                      file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- score the first repeat's final models, the same way
    torch.set_num_threads(args.threads)
    dev = torch.device(device)
    rows = []
    for shape, (L, H, d, T, B) in SHAPES.items():
        steps = args.steps_a if shape == "A" else args.steps_b
        windows = train_lm.val_windows(data / "val.bin", meta["val_tokens"], T, meta["val_tokens"])
        nano = statistics.median(r["tokens_per_s"] for r in res[(shape, "nanoGPT")])
        for name in runs:
            rs = res[(shape, name)]
            out = rs[0]["out"]
            if name == "nanoGPT":
                forward = bn.nanogpt_forward(ng, out, steps, dev)
            else:
                state = torch.load(out / "checkpoints" / f"ckpt_step{steps:08d}.pt", map_location=dev,
                                   weights_only=True)
                forward = train_lm.LM(state["model_cfg"]).to(dev)
                forward.load_state_dict(state["model"])
                forward.eval()
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            rss = [r["rss"] for r in rs if r["rss"] is not None]
            rows.append((f"{shape}: {L}x{d}, T {T}, B {B}", name.replace("ours", "train_lm.py"),
                         "/".join(sorted({r["precision"] for r in rs})), f"{tps:,.0f}", benchlib.fmt_ratio(tps, nano),
                         f"{max(rss):,.0f}" if rss else "-", f"{bn.val_nats(forward, windows, dev):.4f}"))
            print(f"{shape} {name}: per repeat " + ", ".join(f"{r['tokens_per_s']:,.0f}" for r in rs)
                  + " tokens/s", file=sys.stderr)
    info = dict(torch=torch.__version__, threads=args.threads, device=device, precision="precision per run",
                device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")
    benchlib.print_header("train_lm.py vs nanoGPT's train.py", sys.argv, info, busy, others)
    print(f"workload: built-in corpus (pydoc_data.topics, bytes), the same train.bin / val.bin for both; "
          f"{args.steps_a} (A) / {args.steps_b} (B) steps every run, {args.repeats} repeat(s), alternating; "
          f"median tokens/s without start-up, max peak RSS; val loss: all of val.bin "
          f"({meta['val_tokens']:,} tokens) after the same steps\n")
    benchlib.print_table(("shape", "run", "precision", "tokens/s (median)", "ratio to nanoGPT", "peak RSS MB (max)",
                          "val loss (nats/token)"), rows)
    print()
    benchlib.print_footer(busy, others, wall)
    shutil.rmtree(work, ignore_errors=True)
    return 0


SFT_RUNS = {  # table 4's columns: (train_lm.py flags, environment)
    "standard": ([], {}),
    # the standard column with only the allocator setting --resource-efficient makes
    # (common.keep_heap_small), through glibc's own variable: which part of the saving is whose
    "standard + heap": ([], {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}),
    "resource-efficient": (["--resource-efficient"], {}),
}


def sft_modes(args):
    """Table 4's runs: train_sft.py in each SFT_RUNS column, alternating, --repeats
    each; every run a fresh process in a fresh folder (its own peak)."""
    import os
    import subprocess
    import tempfile
    import torch
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode, (flags, env) in SFT_RUNS.items():
                out = Path(tmp) / f"{mode.replace(' ', '')}-{i}"
                cmd = [sys.executable, str(REPO / "train_sft.py"), "--max-steps", str(args.sft_steps),
                       "--log-every", "2", "--device", args.device, "--out", str(out), *flags]
                p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True,  # cwd: no optimal_config.json
                                   env={**os.environ, **env})
                if p.returncode:
                    print(p.stdout[-2000:], p.stderr[-2000:], file=sys.stderr)
                    sys.exit(f"error: the {mode} sft run failed (exit {p.returncode})")
                s = json.loads((out / "summary.json").read_text())
                a = json.loads((out / "args.json").read_text())["chosen"]["loop"]
                logs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
                # the first record holds the first steps' warm-up; the median of the rest
                tps = statistics.median(r["tokens_per_s"] for r in logs[1:] or logs)
                res.setdefault(mode, []).append(dict(tokens_per_s=tps, peak_mb=s["peak_mem_mb"], loop=a,
                                                     torch=torch.__version__, threads=torch.get_num_threads(),
                                                     device=s["device"]))
                print(f"sft {mode:<18} {tps:8.0f} tokens/s, peak {s['peak_mem_mb']:6.0f} MB", file=sys.stderr,
                      flush=True)
    for mode, runs in res.items():
        runs[0]["tensor_mb"] = tensor_peak_mb(runs[0]["loop"])
    return res


def tensor_peak_mb(loop):
    """Peak bytes of live tensors during one forward + backward of the run's first micro-batch
    (its micro-batch size, context and checkpointing, the tiny preset's shape): what
    torch.cuda.max_memory_allocated measures on a GPU, counted here on the CPU without the
    allocator's retention. Every op's output storage is counted from its creation until it is
    freed (a weakref on the storage); the weights, made before, are not counted."""
    import weakref
    import torch
    import train_lm
    import train_sft
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensors(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live, self.now, self.peak = {}, 0, 0

        def free(self, key):
            self.now -= self.live.pop(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key = st.data_ptr()
                    if key and key not in self.live:
                        self.live[key] = st.nbytes()
                        self.now += st.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(st, self.free, key)
            return out

    L, H, d = LONG
    torch.manual_seed(0)
    model = train_lm.LM(dict(arch="gpt", vocab_size=train_sft.SFT_VOCAB, n_layer=L, n_head=H, d_model=d,
                             seq_len=loop["seq_len"], num_eigenstates=32, chunk_size=64))
    model.grad_checkpointing = loop["grad_checkpointing"]
    train = [train_sft.render(p) for p in train_sft.builtin_pairs() if train_sft.split_of(p) >= 2]
    mb = train_sft.sft_batch(0, train, 1337, loop["micro_batch"] * loop["grad_accum"], 0, loop["micro_batch"],
                            loop["seq_len"])
    with LiveTensors() as live:
        loss, n = train_sft.sft_loss_fn(model, mb, torch.device("cpu"))
        (loss / n).backward()
        del loss, n
    return live.peak / 2**20


def print_sft(args, res):
    st, hp, re_ = res["standard"], res["standard + heap"], res["resource-efficient"]
    ts, th, tr = (statistics.median(r["tokens_per_s"] for r in x) for x in (st, hp, re_))
    ms, mh, mr = (max(r["peak_mb"] for r in x) for x in (st, hp, re_))
    a, b = st[0]["loop"], re_[0]["loop"]
    print(f"**train_sft.py, tiny preset, built-in pairs, {args.sft_steps} steps of 64 pairs; standard (the seed's) vs "
          f"--resource-efficient** ({args.repeats} repeat(s), alternating; median speed, max memory)\n")
    rows = [("micro-batch x accumulation", f"{a['micro_batch']} x {a['grad_accum']}", "same",
             f"{b['micro_batch']} x {b['grad_accum']}", ""),
            ("gradient checkpointing, workers", f"{a['grad_checkpointing']}, {a['workers']}", "same",
             f"{b['grad_checkpointing']}, {b['workers']}", ""),
            ("context (seq_len), lr", f"{a['seq_len']}, {a['lr']:g}", "same", f"{b['seq_len']}, {b['lr']:g}", ""),
            ("glibc mmap threshold", "dynamic (default)", "1 MB", "1 MB", ""),
            ("tokens/s, median", f"{ts:,.0f}", f"{th:,.0f}", f"{tr:,.0f}", benchlib.fmt_ratio(tr, ts)),
            ("peak tensor memory, one micro-batch fwd+bwd (MB)", f"{st[0]['tensor_mb']:,.1f}",
             f"{hp[0]['tensor_mb']:,.1f}", f"{re_[0]['tensor_mb']:,.1f}",
             benchlib.fmt_ratio(re_[0]["tensor_mb"], st[0]["tensor_mb"])),
            ("peak memory of the process, max (MB)", f"{ms:,.0f}", f"{mh:,.0f}", f"{mr:,.0f}",
             benchlib.fmt_ratio(mr, ms))]
    benchlib.print_table(("", "standard", "standard + heap setting", "resource-efficient",
                          "efficient / standard"), rows)
    print("\n(peak memory of the process: RSS on a CPU, max allocated on a GPU; on a CPU it includes the Python + "
          "torch runtime, ~300 MB, that all pay. Peak tensor memory: counted in this process, see tensor_peak_mb. "
          "The seed claims -30 to -50 % memory at 40-60 % of the speed)  ")


if __name__ == "__main__":
    sys.exit(main())
