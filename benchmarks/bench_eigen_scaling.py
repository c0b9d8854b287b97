"""bench_eigen_scaling.py -- where the eigen model's training step grows faster than its context.

    python benchmarks/bench_eigen_scaling.py                    # 4K and 32K, ~4 min on 2 busy cores
    python benchmarks/bench_eigen_scaling.py --contexts 4096,8192,16384,32768
    python benchmarks/bench_eigen_scaling.py --quick            # 1K and 4K, 1 repeat: a smoke run

One training step of train_lm.py's eigen LM (forward, backward, clip, AdamW: common.train_step,
as the trainer runs it), batch 1, the shape of bench_lm.py's long-context table by default (4
layers, width 128, 32 eigenstates x 2 cells, chunk 64). Every (context, repeat) is a fresh worker
process (this script with --worker), contexts in turn, so one context's heap never serves another.
Per context: the median step time, and its CPU time split into user and system (the kernel's
share: page faults, which is where fresh large allocations go), then one step under
torch.profiler, its self CPU time grouped by ATen op. The table prints each group's ms at the
first and last context and their ratio: with linear time every ratio would be last/first (8x
from 4K to 32K), so a group with a larger ratio is the super-linear part, with its share.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import pos_int  # noqa: E402  (the trainers' flag types)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--contexts", default="4096,32768", metavar="T,T,...", help="contexts, comma-separated")
parser.add_argument("--n-layer", type=pos_int, default=4, metavar="N", help="blocks")
parser.add_argument("--d-model", type=pos_int, default=128, metavar="D", help="width")
parser.add_argument("--steps", type=pos_int, default=5, metavar="N", help="timed steps per process (median)")
parser.add_argument("--repeats", type=pos_int, default=2, metavar="R", help="fresh processes per context, in turn")
parser.add_argument("--threads", type=pos_int, default=1, metavar="N", help="torch threads in every worker")
parser.add_argument("--quick", action="store_true", help="contexts 1024,4096, 1 repeat, 3 steps")
parser.add_argument("--worker", type=pos_int, default=None, metavar="T", help=argparse.SUPPRESS)

GROUPS = [  # (label, ATen op names): the step's self CPU time, grouped; the rest is "other"
    ("matmuls (Linear, bmm)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("elementwise (mul, add, exp, cos, ...)", ("aten::mul", "aten::add", "aten::sub", "aten::exp", "aten::cos",
                                               "aten::sin", "aten::div", "aten::add_", "aten::mul_", "aten::neg",
                                               "aten::log", "aten::sigmoid", "aten::where", "aten::clamp")),
    ("GELU, LayerNorm", ("aten::gelu", "aten::gelu_backward", "aten::native_layer_norm",
                         "aten::native_layer_norm_backward")),
    ("cross-entropy, log-softmax", ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
                                    "aten::nll_loss_backward")),
    ("copies, stack, cat, pad", ("aten::copy_", "aten::stack", "aten::cat", "aten::clone", "aten::constant_pad_nd",
                                 "aten::_to_copy", "aten::contiguous", "aten::index_select",
                                 "aten::embedding_dense_backward")),
    ("zeros, fills (fresh memory)", ("aten::zero_", "aten::fill_", "aten::empty", "aten::zeros", "aten::empty_strided",
                                     "aten::new_zeros", "aten::ones_like", "aten::zeros_like", "aten::resize_")),
    ("AdamW, clip", ("aten::_fused_adamw_", "aten::_foreach_norm", "aten::_foreach_mul_", "aten::linalg_vector_norm",
                     "aten::_foreach_add_", "aten::_foreach_lerp_", "aten::_foreach_addcmul_",
                     "aten::_foreach_sqrt", "aten::_foreach_div_", "aten::_foreach_addcdiv_")),
]


def worker(T, args):
    import resource

    import torch

    import common
    import train_lm
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    os.chdir(REPO)
    data = train_lm.builtin_corpus(lambda m: print(m, file=sys.stderr))
    meta = train_lm.load_meta(data, T)
    torch.manual_seed(0)
    cfg = dict(arch="eigen", vocab_size=meta["vocab_size"], n_layer=args.n_layer, n_head=4, d_model=args.d_model,
               seq_len=T, num_eigenstates=32, chunk_size=64)
    model = train_lm.LM(cfg)
    opt = common.make_optimizer(list(model.parameters()), argparse.Namespace(optim="adamw"), lr=1e-3,
                                fused=common.fused_adamw(device))
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def step(i):
        batch = train_lm.get_batch(data / "train.bin", meta["train_tokens"], T, 0, i, 1, 0, 1)
        common.train_step(model, opt, scaler, batch, lambda m, b: train_lm.loss_fn(m, b, device), 1, clip=1.0,
                          device=device, amp_dtype=None)

    for i in range(2):  # warm-up: AdamW's state, the allocator's first sizes
        step(i)
    times, user, system = [], [], []
    for i in range(args.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(2 + i)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        times.append(time.perf_counter() - t0)
        user.append(r1.ru_utime - r0.ru_utime)
        system.append(r1.ru_stime - r0.ru_stime)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(2 + args.steps)
    ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}  # ms
    print(json.dumps({"T": T, "step_ms": 1e3 * statistics.median(times), "user_ms": 1e3 * statistics.median(user),
                      "sys_ms": 1e3 * statistics.median(system), "ops": ops,
                      "peak_rss_mb": common.peak_memory_mb(device)}))
    return 0


def main():
    args = parser.parse_args()
    if args.quick:
        args.contexts, args.repeats, args.steps = "1024,4096", 1, 3
    if args.worker:
        return worker(args.worker, args)
    try:
        contexts = [int(t) for t in args.contexts.split(",")]
    except ValueError:
        parser.error(f"--contexts {args.contexts}: give comma-separated integers")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    res = {}
    for rep in range(args.repeats):
        for T in contexts:
            flags = ["--worker", str(T), "--n-layer", str(args.n_layer), "--d-model", str(args.d_model),
                     "--steps", str(args.steps), "--threads", str(args.threads)]
            print(f"context {T} ({rep + 1}/{args.repeats})", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, *flags], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"worker at context {T} failed:\n{out.stderr[-3000:]}")
            res.setdefault(T, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {T: {k: statistics.median(r[k] for r in runs) for k in ("step_ms", "user_ms", "sys_ms", "peak_rss_mb")}
           for T, runs in res.items()}
    import torch
    print(f"command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ")
    print(f"eigen LM, {args.n_layer} layers, width {args.d_model}, 32 eigenstates x 2 cells, chunk 64, batch 1, "
          f"fp32, {args.threads} thread(s), torch {torch.__version__}; median of {args.steps} steps x {args.repeats} "
          "processes  \n")
    first, last = contexts[0], contexts[-1]
    print("| context | ms/step | user ms | system ms | ms per 1K tokens | peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T in contexts:
        m = med[T]
        print(f"| {T:,} | {m['step_ms']:,.0f} | {m['user_ms']:,.0f} | {m['sys_ms']:,.0f} | "
              f"{1024 * m['step_ms'] / T:,.1f} | {m['peak_rss_mb']:,.0f} |")
    cpu = {T: med[T]["user_ms"] + med[T]["sys_ms"] for T in (first, last)}
    print(f"\n{last:,} vs {first:,}: time x{med[last]['step_ms'] / med[first]['step_ms']:.2f}, CPU time (user + "
          f"system, steadier on a shared machine) x{cpu[last] / cpu[first]:.2f}, system alone "
          f"x{med[last]['sys_ms'] / max(1e-9, med[first]['sys_ms']):.1f} (linear: x{last / first:g})  \n")
    # one profiled step per process: the median over repeats of each group's self CPU ms
    grouped = {}
    for T in (first, last):
        for r in res[T]:
            seen = dict.fromkeys([g for g, _ in GROUPS] + ["other ATen ops"], 0.0)
            for op, ms in r["ops"].items():
                g = next((g for g, names in GROUPS if op in names), "other ATen ops")
                seen[g] += ms
            for g, ms in seen.items():
                grouped.setdefault((g, T), []).append(ms)
    print(f"| part of the step (self CPU, one profiled step) | ms at {first:,} | ms at {last:,} | ratio | "
          f"ms above linear at {last:,} |")
    print("|---|---:|---:|---:|---:|")
    for g in [g for g, _ in GROUPS] + ["other ATen ops"]:
        a, b = statistics.median(grouped[(g, first)]), statistics.median(grouped[(g, last)])
        print(f"| {g} | {a:,.1f} | {b:,.1f} | {b / a if a else float('nan'):.1f}x | {b - a * last / first:+,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
