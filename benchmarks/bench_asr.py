"""bench_asr.py -- the seed's model-size table for train_asr.py, measured here in one run.

For each preset (original d256 12+6, optimized d192 8+4, minimal d128 6+3), each batch size and
with and without the x4 time subsampling in front of the encoder: parameters, step time and
peak memory of one training step (forward, backward, AdamW) on 10-second utterances, with the
trainer's own model, loss and step (common.train_step). Prints a markdown table for the README.

    python benchmarks/bench_asr.py                                   # CPU, ~10 min on 2 cores
    python benchmarks/bench_asr.py --presets minimal --batch-sizes 2 --steps 1   # a quick look
    python benchmarks/bench_asr.py --device cuda                     # GPU: adds peak GPU memory

Each configuration runs in a fresh subprocess (this script re-invoked with --worker), so peak
memory is that configuration's alone. The input is random features of the right shape: the cost
of a step does not depend on what the audio says.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import psutil

import benchlib  # the parent side shared with the other benchmarks (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import nonneg_int, pos_float, pos_int  # noqa: E402  (the trainers' flag types)

PRESETS = ("original", "optimized", "minimal")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS), help="presets to measure")
parser.add_argument("--batch-sizes", nargs="+", type=pos_int, default=[2, 8], metavar="N",
                    help="utterances per step (the seed's T4 used 2)")
parser.add_argument("--subsample", nargs="+", type=int, choices=[4, 1], default=[4, 1],
                    help="time subsampling settings to compare (1 = the seed's model)")
parser.add_argument("--seconds", type=pos_float, default=10.0, help="utterance length")
parser.add_argument("--chars", type=pos_int, default=100, help="characters per transcript (~10 per second)")
parser.add_argument("--vocab", type=pos_int, default=200, help="vocabulary size (the seed's vocab.json: 200)")
parser.add_argument("--steps", type=pos_int, default=2, help="timed optimizer steps per configuration")
parser.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps first")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = cuda when available; CUDA runs bf16 (fp16 + GradScaler where unsupported)")
parser.add_argument("--worker", default=None, help="internal: PRESET,BATCH,SUBSAMPLE measured in this process")


# -----------------------------------------------------------------------------
# worker: one configuration, one fresh process

def worker(args):
    import torch
    import common
    import train_asr

    preset, bs, sub = args.worker.split(",")
    bs, sub = int(bs), int(sub)
    torch.manual_seed(0)
    choice = argparse.Namespace(device=args.device, precision="auto")
    device, amp_dtype, scaler, _ = common.setup_device(choice)
    frames = int(args.seconds * 100) + 1  # 10 ms hop
    U = args.chars
    batch = {"feats": torch.randn(bs, frames, train_asr.N_MELS), "feat_len": torch.full((bs,), frames),
             "chars": torch.randint(5, args.vocab, (bs, U)), "tgt_len": torch.full((bs,), U)}
    batch["dec_in"] = torch.cat([torch.full((bs, 1), train_asr.SOS), batch["chars"]], 1)
    batch["dec_out"] = torch.cat([batch["chars"], torch.full((bs, 1), train_asr.EOS)], 1)
    batch = {k: v.to(device) for k, v in batch.items()}
    rss_base = psutil.Process().memory_info().rss / 2**20

    model = train_asr.build_model(train_asr.PRESETS[preset], args.vocab,
                                  {"heads": 4, "dropout": 0.1, "subsample": sub}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, micro_bs = [], bs
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, _, micro_bs = common.train_step(model, optimizer, scaler, batch,
                                              lambda m, b: train_asr.loss_fn(m, b, 0.3), micro_bs, 5.0,
                                              device, amp_dtype, log=lambda msg: print(msg, file=sys.stderr))
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(json.dumps({
        "preset": preset, "batch": bs, "subsample": sub, "params": sum(p.numel() for p in model.parameters()),
        "step_s": step_s, "samples_per_s": bs / step_s, "rss_base_mb": rss_base,
        "peak_rss_mb": common.peak_memory_mb(torch.device("cpu")),
        "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "micro_bs": micro_bs,
        **benchlib.runtime_info(device, choice.precision + (" + GradScaler" if scaler.is_enabled() else ""))}))
    return 0


# -----------------------------------------------------------------------------
# parent: every configuration in a fresh worker, then the table

def main():
    args = parser.parse_args()
    if args.worker:
        import common
        common.run_main(lambda: worker(args))
    if args.chars > args.seconds * 100 / 4:
        parser.error(f"--chars {args.chars} is more than the {int(args.seconds * 25)} encoder frames of "
                     f"{args.seconds:g} s at x4 subsampling; CTC could not align it")
    flags = ["--seconds", str(args.seconds), "--chars", str(args.chars), "--vocab", str(args.vocab),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    configs = [(p, b, s) for p in args.presets for s in args.subsample for b in args.batch_sizes]
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {}
    for i, (p, b, s) in enumerate(configs, start=1):
        t0 = time.perf_counter()
        res = benchlib.run_worker(Path(__file__).resolve(), f"{p},{b},{s}", flags)
        results[(p, b, s)] = res
        print(f"[{i}/{len(configs)}] {p:<9} batch {b} subsample x{s}: step {res['step_s']:.2f} s, peak RSS "
              f"{res['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    first = next(iter(results.values()))
    gpu = first["device"] == "cuda"
    header = ["preset", "subsample", "parameters", "batch", "step (s)", "utterances/s",
              "peak RSS above runtime (MB)"] + (["peak GPU memory (MB)"] if gpu else [])
    rows = []
    for (p, b, s), r in results.items():
        rows.append([p, f"x{s}", f"{r['params'] / 1e6:.2f}M", str(b), f"{r['step_s']:.2f}", f"{r['samples_per_s']:.2f}",
                     f"{r['peak_rss_mb'] - r['rss_base_mb']:.0f}"] + ([f"{r['gpu_peak_mb']:.0f}"] if gpu else []))
    benchlib.print_header("ASR: presets x batch x subsampling", sys.argv, first, busy, others)
    print(f"workload: {args.seconds:g} s utterances ({int(args.seconds * 100) + 1} feature frames), "
          f"{args.chars}-character transcripts, vocabulary {args.vocab}; one training step = forward, "
          f"CTC 0.3 + attention 0.7 loss, backward, clip 5, AdamW; {args.warmup} warm-up + {args.steps} timed "
          f"step(s), median; each configuration in a fresh process\n")
    benchlib.print_table(header, rows)
    print()
    key = "gpu_peak_mb" if gpu else None
    for p in args.presets:
        for b in args.batch_sizes:
            if (p, b, 4) in results and (p, b, 1) in results:
                r4, r1 = results[(p, b, 4)], results[(p, b, 1)]
                m4 = r4[key] if key else r4["peak_rss_mb"] - r4["rss_base_mb"]
                m1 = r1[key] if key else r1["peak_rss_mb"] - r1["rss_base_mb"]
                print(f"{p}, batch {b}: subsampling x4 takes {benchlib.fmt_ratio(r4['step_s'], r1['step_s'])} the "
                      f"step time and {benchlib.fmt_ratio(m4, m1)} the memory of no subsampling  ")
    print("peak RSS includes the Python + torch runtime; the column shows what the model, its gradients, "
          "AdamW state and activations added  ")
    if any(r["micro_bs"] != r["batch"] for r in results.values()):
        print("note: a configuration ran out of memory and halved its micro-batch (same batch, accumulated)  ")
    benchlib.print_footer(busy, others, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
