"""bench_classifier.py -- the seed's "full fine-tuning vs LoRA" table for train_classifier.py, measured here.

Trains four configurations with train_classifier.py's own pieces (generate_items, build_vocab,
Tokenizer, Encoder, add_lora, trim, classify) and the trainers' step (common.train_step):
{DistilBERT shape, small preset} x {full fine-tuning, LoRA r 16, alpha 32 on q and v, head
trainable}, and prints a markdown table for the README: trainable and total parameters, peak
memory, step time, training samples/s, time per epoch and test accuracy.

    python benchmarks/bench_classifier.py                        # laptop CPU, ~2 min on 2 idle cores
    python benchmarks/bench_classifier.py --steps 2 --warmup 1 --epochs-small 1   # quick look, ~30 s
    python benchmarks/bench_classifier.py --full-accuracy        # + DistilBERT shapes 1 epoch each: ~4 min
    python benchmarks/bench_classifier.py --device cuda          # GPU: adds peak GPU memory
    python benchmarks/bench_classifier.py --precision compare --full-accuracy   # fp32 vs bf16, ~7 min per repeat
    python benchmarks/bench_classifier.py --precision compare --steps 2 --warmup 1 --epochs-small 1 --repeats 1
                                                                 # quick look at the comparison, ~90 s

--precision compare trains every configuration in fp32 and in bf16 autocast (fresh workers,
alternating) and prints samples/s, bf16 / fp32 and test accuracy of each, then the verdict for
the DistilBERT shape with LoRA: at least 1.5x fp32's samples/s at equal test accuracy (within 1
point). Its accuracy is measured only with --full-accuracy (else the shape trains a few steps).
The two --precision compare times: measured on 2 cores shared with other jobs; --repeats defaults to 3.

There are no pretrained weights on this machine, so both arms start from the same random
initialisation (torch.manual_seed(0)). LoRA on a random frozen encoder measures what LoRA saves
in memory and time; its accuracy here is not what LoRA reaches on a pretrained model.

The table goes to stdout, progress to stderr: `python benchmarks/bench_classifier.py > table.md`.
Each measurement runs in a fresh subprocess (this script re-invoked with --worker CONFIG, which
prints one JSON line), so one configuration's peak memory never includes another's.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import psutil

import benchlib  # the parent side shared with bench_gru.py (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import nonneg_int, pos_int  # noqa: E402  (the trainers' flag types)
CONFIGS = ("small-full", "small-lora", "distilbert-full", "distilbert-lora")
DISTILBERT_VOCAB = 30522  # distilbert-base-uncased's vocab.txt; the built vocabulary is padded up to it
DISTILBERT_LORA_TRAINABLE = 891_656  # the seed's adapter: 12 x 16 x (768 + 768) LoRA + 590,592 + 6,152 head
LORA = dict(targets=["q", "v"], r=16, alpha=32, dropout=0.1)  # the seed's PEFT config
LR = {"small-full": 1e-3, "small-lora": 1e-3,  # train_classifier's lr for --model small
      "distilbert-full": 5e-5, "distilbert-lora": 1e-3}  # its defaults for --pretrained full / LoRA

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=pos_int, default=16, metavar="N",
                    help="micro-batch size (items per forward/backward)")
parser.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum", type=pos_int, default=1,
                    metavar="K", help="micro-batches per optimizer step; effective batch = N x K "
                                      "(16, the trainer's default)")
parser.add_argument("--steps", type=pos_int, default=6, metavar="N",
                    help="timed optimizer steps for the DistilBERT shape (it is slow on a CPU, so it "
                         "trains a few steps, not whole epochs, unless --full-accuracy)")
parser.add_argument("--warmup", type=nonneg_int, default=2, metavar="N",
                    help="untimed optimizer steps before timing (allocator, thread pools, AdamW state)")
parser.add_argument("--epochs-small", type=pos_int, default=3, metavar="N",
                    help="whole epochs the small preset trains (every step after --warmup is timed), "
                         "then its test accuracy is measured; 3 is train_classifier's --quick")
parser.add_argument("--full-accuracy", action="store_true",
                    help="also train the DistilBERT shape for --epochs-distilbert whole epochs and "
                         "measure its test accuracy (slow: per epoch on 2 cores ~40 s full, ~20 s LoRA)")
parser.add_argument("--epochs-distilbert", type=pos_int, default=1, metavar="N",
                    help="whole epochs for the DistilBERT shape with --full-accuracy")
parser.add_argument("--repeats", type=pos_int, default=3, metavar="R",
                    help="fresh worker processes per configuration, run alternately; the table shows "
                         "median speed and accuracy and max memory over them (~35 s per repeat on 2 "
                         "idle cores)")
parser.add_argument("--train-size", type=pos_int, default=840, metavar="N",
                    help="built-in training items (seed 0; plus 15%% each for validation and test), "
                         "the seed's 840")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = cuda when available; CPU runs fp32, CUDA bf16 (fp16 + GradScaler "
                         "where bf16 is unsupported)")
parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "compare"], default="auto",
                    help="auto = the --device default above (fp32 on CPU); bf16 = bf16 autocast for "
                         "every configuration; compare = each configuration in fp32 and in bf16, "
                         "alternating, and a bf16 vs fp32 table")
parser.add_argument("--worker", choices=CONFIGS, default=None,
                    help="internal: measure this one configuration in this process and print one JSON "
                         "line (the parent run starts these)")


# -----------------------------------------------------------------------------
# worker: one configuration, one fresh process

def worker(args):
    import torch
    import torch.nn.functional as F
    import common
    import train_classifier as tc

    shape, arm = args.worker.split("-")  # "distilbert", "lora"
    choice = argparse.Namespace(device=args.device, precision=args.precision)  # compare's workers get fp32/bf16
    device, amp_dtype, scaler, _ = common.setup_device(choice)  # the trainers' own choice
    precision = choice.precision + (" + GradScaler" if scaler.is_enabled() else "")

    # -- data: the trainer's built-in items, vocabulary and pre-tokenized splits (max-len 64)
    train_rows, val_rows, test_rows = tc.generate_items(args.train_size, seed=0)
    labels = sorted({l for _, l in train_rows})
    itos = tc.build_vocab([t for t, _ in train_rows], 8000)  # train_classifier's --vocab-size default
    n_built = len(itos)
    if shape == "distilbert":
        # DistilBERT's real vocabulary size, so the embedding and the parameter counts are the real
        # ones; the dummy entries never match a word, so tokenization is unchanged
        itos = itos + [f"[unused{i}]" for i in range(DISTILBERT_VOCAB - len(itos))]
    tok = tc.Tokenizer(itos)
    lab = {l: i for i, l in enumerate(labels)}
    splits = {}
    for name, rows in (("train", train_rows), ("test", test_rows)):
        ids, mask = tok.encode([t for t, _ in rows], 64)  # (N, 64) each
        splits[name] = {"ids": ids, "mask": mask, "y": torch.tensor([lab[l] for _, l in rows])}
    rss_base = psutil.Process().memory_info().rss / 2**20  # interpreter + torch + data, no model

    # -- model: the same random init for both arms (no pretrained weights here)
    torch.manual_seed(0)
    model = tc.Encoder(len(itos), len(labels), **tc.PRESETS[shape])
    if arm == "lora":  # before .to(device): LoRALinear builds its layers on the CPU
        tc.add_lora(model, LORA["targets"], LORA["r"], LORA["alpha"], LORA["dropout"])
    model.to(device)
    n_params, n_trainable = common.count_params(model)
    if args.worker == "distilbert-lora" and n_trainable != DISTILBERT_LORA_TRAINABLE:
        raise SystemExit(f"error: DistilBERT + LoRA has {n_trainable:,} trainable parameters, the seed's "
                         f"adapter has {DISTILBERT_LORA_TRAINABLE:,} ({len(labels)} labels, vocab "
                         f"{len(itos)}); train_classifier.py's Encoder or add_lora changed")

    # -- optimizer and schedule, as train_classifier.py builds them
    E = args.batch_size * args.grad_accum
    n_train = len(train_rows)
    steps_per_epoch = math.ceil(n_train / E)
    lr = LR[args.worker]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    whole_epochs = shape == "small" or args.full_accuracy
    epochs = args.epochs_small if shape == "small" else args.epochs_distilbert if args.full_accuracy else 1
    total_steps = epochs * steps_per_epoch if whole_epochs else args.warmup + args.steps
    warmup = max(1, min(50, steps_per_epoch // 2))
    # the schedule of an `epochs`-epoch run, also when only the first steps are timed
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (epochs * steps_per_epoch - s) /
                                                        max(1, epochs * steps_per_epoch - warmup))))

    def loss_fn(m, mb):
        logits = m(mb["ids"].to(device), mb["mask"].to(device))
        return F.cross_entropy(logits.float(), mb["y"].to(device), reduction="sum"), len(mb["y"])

    def sync():  # CUDA kernels run asynchronously: time them, not their launch
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # -- the steps: the trainer's epoch order and trimmed batches, so step times vary with the
    # longest item of each batch as in a real run (hence the median)
    micro_bs, times, losses, epoch_s, step = args.batch_size, [], [], [], 0
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch))  # --seed 0
        t_epoch = time.perf_counter()
        for i in range(steps_per_epoch):
            if step == total_steps:  # the DistilBERT shape's timed steps end inside the first epoch
                break
            idx = perm[i * E:(i + 1) * E]
            batch = tc.trim({k: v[idx] for k, v in splits["train"].items()})  # ids, mask (B, T); y (B,)
            sync()
            t0 = time.perf_counter()
            loss, _, micro_bs = common.train_step(model, optimizer, scaler, batch, loss_fn, micro_bs, clip=1.0,
                                                  device=device, amp_dtype=amp_dtype, log=lambda msg: print(msg, file=sys.stderr))
            scheduler.step()
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss)
            step += 1
        if step == (epoch + 1) * steps_per_epoch:  # a whole epoch ran
            epoch_s.append(time.perf_counter() - t_epoch)
    peak_rss = common.peak_memory_mb(torch.device("cpu"))  # before the test pass: training's peak
    gpu_peak = common.peak_memory_mb(device) if device.type == "cuda" else None

    test_acc = None
    if whole_epochs:  # after the last epoch (the trainer would reload its best-on-validation checkpoint)
        t = splits["test"]
        probs = tc.classify(model, t["ids"], t["mask"], device, amp_dtype)
        test_acc = (probs.argmax(-1) == t["y"]).double().mean().item()

    # fp32 weights + their gradients + AdamW's exp_avg and exp_avg_sq: what full fine-tuning multiplies
    state_mb = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in model.parameters()) / 2**20
    step_s = statistics.median(times)
    print(json.dumps({
        "config": args.worker, "params": n_params, "trainable": n_trainable, "state_mb": state_mb,
        "step_s": step_s, "samples_per_s": E / step_s, "epoch_est_s": steps_per_epoch * step_s,
        "epoch_s": epoch_s, "steps_per_epoch": steps_per_epoch, "timed_steps": len(times),
        "steps": step, "epochs": epochs if whole_epochs else None, "test_acc": test_acc,
        "n_test": len(test_rows), "lr": lr, "step_times": times, "loss_first": losses[0], "loss_last": losses[-1],
        "rss_base_mb": rss_base, "peak_rss_mb": peak_rss, "gpu_peak_mb": gpu_peak, "micro_bs": micro_bs,
        "vocab": len(itos), "vocab_built": n_built, "n_labels": len(labels), "n_train": n_train,
        **benchlib.runtime_info(device, precision)}))
    return 0


# -----------------------------------------------------------------------------
# parent: alternate configurations in fresh workers, then the table

def print_progress(done, n_runs, label, res, seconds):
    """One worker's result on stderr as it finishes."""
    acc = f", test acc {res['test_acc']:.3f}" if res["test_acc"] is not None else ""
    print(f"[{done}/{n_runs}] {label:<15} {res['samples_per_s']:7.1f} samples/s, step "
          f"{res['step_s'] * 1000:7.1f} ms, peak RSS {res['peak_rss_mb']:6.0f} MB, loss "
          f"{res['loss_first']:.3f} -> {res['loss_last']:.3f} ({res['steps']} steps){acc} "
          f"({seconds:.0f} s)", file=sys.stderr, flush=True)


def compare(args, flags):
    """--precision compare: every configuration in fp32 and in bf16 autocast, each run in a fresh
    worker, the two precisions alternating run by run; then the bf16 vs fp32 table and the
    verdict for DistilBERT + LoRA."""
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {c: {p: [] for p in benchlib.PRECISIONS} for c in CONFIGS}
    n_runs, done = 2 * len(CONFIGS) * args.repeats, 0
    for repeat in range(args.repeats):
        for config in CONFIGS:
            for prec in benchlib.precision_order(repeat):
                t0 = time.perf_counter()
                res = benchlib.run_worker(Path(__file__).resolve(), config, flags + ["--precision", prec])
                results[config][prec].append(res)
                done += 1
                print_progress(done, n_runs, f"{config} {prec}", res, time.perf_counter() - t0)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    o = results["small-full"]["fp32"][0]
    E = args.batch_size * args.grad_accum
    benchlib.print_header("Receipt classifier: fp32 vs bf16 autocast", sys.argv,
                          dict(o, precision="fp32 vs bf16 autocast"), busy, others)
    d_steps = (f"{args.epochs_distilbert} epoch(s), then test accuracy" if args.full_accuracy else
               f"{args.warmup} warm-up + {args.steps} timed steps, no accuracy (add --full-accuracy)")
    print(f"workload: as the full vs LoRA table (`python benchmarks/bench_classifier.py`): {o['n_train']} "
          f"built-in items, batch {E}, LoRA r {LORA['r']} on {','.join(LORA['targets'])}; small preset "
          f"{args.epochs_small} epoch(s), then test accuracy; DistilBERT shape {d_steps}. bf16 = "
          f"common.train_step and the test pass (train_classifier.classify) under bf16 autocast, weights "
          f"and AdamW in fp32. {args.repeats} repeat(s) per configuration and precision, each in a fresh "
          f"process, fp32 and bf16 alternating; medians shown\n")
    benchlib.print_precision_table("configuration", results, "test accuracy", "test_acc", "{:.3f}".format)
    sps, acc = benchlib.precision_medians(results["distilbert-lora"], "test_acc")
    ratio = sps["bf16"] / sps["fp32"]
    if acc["fp32"] is None:
        print(f"verdict, distilbert-lora: bf16 {ratio:.2f}x fp32's samples/s; test accuracy not measured "
              f"(add --full-accuracy): no verdict  ")
    else:
        ok = ratio >= 1.5 and abs(acc["bf16"] - acc["fp32"]) <= 0.01
        print(f"verdict, distilbert-lora: bf16 {ratio:.2f}x fp32's samples/s, test accuracy "
              f"{acc['bf16']:.3f} (bf16) vs {acc['fp32']:.3f} (fp32): >= 1.5x at equal accuracy "
              f"(within 1 point): {'PASS' if ok else 'FAIL'}  ")
    benchlib.print_micro_bs_note({f"{c} {p}": runs for c in CONFIGS for p, runs in results[c].items()},
                                 args.batch_size)
    benchlib.print_footer(busy, others, wall)
    return 0


def main():
    args = parser.parse_args()
    if args.worker:
        import common
        common.run_main(lambda: worker(args))  # a common.UserError: one line, exit 2
    E = args.batch_size * args.grad_accum
    if E > args.train_size:
        parser.error(f"effective batch {E} (--batch-size x --grad-accum) is larger than --train-size "
                     f"{args.train_size}; raise --train-size")
    if args.warmup >= args.epochs_small * math.ceil(args.train_size / E):
        parser.error(f"--warmup {args.warmup} leaves no timed step in the small preset's "
                     f"{args.epochs_small} epoch(s); lower --warmup or raise --epochs-small")
    if args.full_accuracy and args.warmup >= args.epochs_distilbert * math.ceil(args.train_size / E):
        parser.error(f"--warmup {args.warmup} leaves no timed step in --epochs-distilbert "
                     f"{args.epochs_distilbert}; lower --warmup")

    # the flags every worker gets: the parent's own, so the workers measure what was asked for
    flags = ["--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--epochs-small", str(args.epochs_small),
             "--epochs-distilbert", str(args.epochs_distilbert), "--train-size", str(args.train_size),
             "--device", args.device] + (["--full-accuracy"] if args.full_accuracy else [])
    if args.precision == "compare":
        return compare(args, flags)
    flags += ["--precision", args.precision]
    # other work on the machine slows the steps (on 2 cores, one other torch process made a
    # 2-thread step here ~30x slower: OpenMP threads wait for each other at every op), so the
    # report says how much CPU others used
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {c: [] for c in CONFIGS}
    n_runs, done = len(CONFIGS) * args.repeats, 0
    for _ in range(args.repeats):
        for config in CONFIGS:  # alternating, so slow drift (thermals, neighbours) hits all alike
            t0 = time.perf_counter()
            res = benchlib.run_worker(Path(__file__).resolve(), config, flags)
            results[config].append(res)
            done += 1
            print_progress(done, n_runs, config, res, time.perf_counter() - t0)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- summary over repeats: median speed and accuracy, max memory
    def med(c, k):
        return statistics.median(r[k] for r in results[c])

    def mx(c, k):
        return max(r[k] for r in results[c])

    first = {c: results[c][0] for c in CONFIGS}
    spe = first["small-full"]["steps_per_epoch"]
    rows = []

    def row(name, key, fmt, agg, ratio=True):
        cells = [name]
        for shape in ("small", "distilbert"):
            full, lora = agg(f"{shape}-full", key), agg(f"{shape}-lora", key)
            cells += [fmt(full), fmt(lora), benchlib.fmt_ratio(lora, full) if ratio else ""]
        rows.append(cells)

    def first_of(c, k):
        return first[c][k]

    row("trainable parameters", "trainable", "{:,}".format, first_of)
    row("total parameters", "params", "{:,}".format, first_of)
    row("weights + grads + AdamW state, computed (MB)", "state_mb", "{:.0f}".format, first_of)
    row("peak RSS, max (MB)", "peak_rss_mb", "{:.0f}".format, mx)
    row("RSS before the model is built (MB)", "rss_base_mb", "{:.0f}".format, med, ratio=False)
    above = ["peak RSS above that (MB)"]
    for shape in ("small", "distilbert"):
        full, lora = (max(r["peak_rss_mb"] - r["rss_base_mb"] for r in results[f"{shape}-{arm}"])
                      for arm in ("full", "lora"))
        above += [f"{full:.0f}", f"{lora:.0f}", benchlib.fmt_ratio(lora, full)]
    rows.append(above)
    if first["small-full"]["device"] == "cuda":
        row("peak GPU memory, max_memory_allocated (MB)", "gpu_peak_mb", "{:.0f}".format, mx)
    row("step time, median (ms)", "step_s", lambda v: f"{v * 1000:.1f}", med)
    row("training samples/s, median", "samples_per_s", "{:.1f}".format, med)
    row(f"time per epoch, {spe} steps x median step (s)", "epoch_est_s", "{:.1f}".format, med)
    acc = ["test accuracy"]
    for shape in ("small", "distilbert"):
        for arm in ("full", "lora"):
            r = first[f"{shape}-{arm}"]
            acc.append(f"{med(f'{shape}-{arm}', 'test_acc'):.3f} ({r['epochs']} ep)" if r["test_acc"] is not None
                       else f"n/a ({r['steps']} steps only)")
        acc.append("")
    rows.append(acc)

    # -- report
    o, d = first["small-full"], first["distilbert-full"]
    benchlib.print_header("Receipt classifier: full fine-tuning vs LoRA", sys.argv, o, busy, others)
    d_steps = (f"{args.epochs_distilbert} epoch(s)" if args.full_accuracy else
               f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"workload: {o['n_train']} built-in receipt items (seed 0), {o['n_labels']} labels, max-len 64 "
          f"(batches trimmed to their longest item); batch {E} ({args.batch_size} x {args.grad_accum}), "
          f"{spe} steps per epoch; AdamW wd 0.01, linear warm-up/decay, clip 1.0; LoRA r {LORA['r']}, "
          f"alpha {LORA['alpha']} on {','.join(LORA['targets'])}, head trainable. small preset "
          f"(4 x 256, vocabulary {o['vocab']} built from the data): lr 1e-3, {args.epochs_small} epochs, "
          f"timed after {args.warmup} warm-up steps. DistilBERT shape (6 x 768, vocabulary {d['vocab']}: "
          f"the {d['vocab_built']} built entries padded to DistilBERT's): lr 5e-5 full / 1e-3 LoRA, "
          f"{d_steps}. {args.repeats} repeat(s) per configuration, each in a fresh process, alternating\n")
    benchlib.print_table(["", "small: full", "small: LoRA", "LoRA / full", "DistilBERT: full", "DistilBERT: LoRA",
                          "LoRA / full"], rows)
    print()
    print("LoRA here wraps a randomly initialised, frozen encoder: there are no pretrained weights on this "
          "machine, and both arms start from the same init (torch.manual_seed(0)). This is a memory and "
          "speed comparison; the LoRA accuracy above is not what LoRA reaches on a pretrained model (with "
          "the real pretrained all-MiniLM-L6 checkpoint, LoRA reached 0.951 test accuracy after 1 epoch: "
          "see the README)  ")
    print("test accuracy is on the test split after the last epoch (train_classifier.py would reload its "
          "best-on-validation checkpoint first); time per epoch is steps per epoch x the median step, "
          "without the evaluation pass  ")
    small_ep = {c: [s for r in results[c] for s in r["epoch_s"]] for c in ("small-full", "small-lora")}
    print("small preset, measured epoch wall times (s): " + "; ".join(
        f"{c.split('-')[1]} {', '.join(f'{s:.1f}' for s in v)}" for c, v in small_ep.items()) + "  ")
    if args.repeats > 1:
        benchlib.print_per_repeat(results)
    benchlib.print_micro_bs_note(results, args.batch_size)
    print("peak RSS includes the Python + torch runtime and the tokenized data; the row below it is what "
          "the model, its gradients, AdamW state and activations added  ")
    if max(busy, others or 0) >= 20:
        print("note: other processes shared the CPU with this run; steps that shared the cores are "
              "much slower. For the README, re-run on an idle machine  ")
    print(f"total wall time: {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
