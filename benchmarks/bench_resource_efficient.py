"""bench_resource_efficient.py -- does --resource-efficient lower the memory a run adds, in every
trainer, at an acceptable speed? (issue 31: at most 0.7x of the standard run's added memory, goal
0.5-0.7x, at no less than 0.4x of its speed; and it never raises a length or size the user's other
settings chose.)

For each trainer and each of two shapes -- its `--quick` run and its default run (no --quick) --
runs the real script in standard mode and with --resource-efficient (the order alternates across
repeats, so slow drift on the machine hits both alike), each a fresh subprocess from the repo root
with `--device cpu --precision fp32`, an empty --config (an optimal_config.json in the repo root
changes nothing) and OMP_NUM_THREADS=--threads, and reads back the summary.json and args.json each
one writes. Each mode runs twice: once plain, once with --measure-peak, because torch's profiler
behind --measure-peak holds its own records in RSS (+50-100 MB of peak RSS on train_gru.py --quick,
more than the whole saving being measured) and slows the profiled steps ~2x:

- added RSS (plain run): summary.json's peak_mem_mb (the trainer's own peak RSS, VmHWM) minus the
  peak RSS of the torch runtime, so that its fixed cost, the same in both modes, does not hide the
  saving (issue 31): a bare process that imports the same trainer module and builds a
  torch.optim.AdamW on one tensor (measured once per trainer, in a subprocess with the same
  environment: bare_rss_mb's second value). The AdamW counts as runtime because torch 2.13's
  Optimizer.add_param_group imports torch._dynamo and sympy on first use, ~70 MB that every run of
  every trainer pays in both modes, whatever it trains: ~225 MB for the import, ~290 MB with the
  AdamW. The added RSS above the bare import alone is shown beside it, not judged;
- peak tensor (--measure-peak run): summary.json's peak_tensor_mb, the peak bytes of live tensors
  in the largest training step (torch's profiler, memory_plan.py);
- speed (plain run): tokens_per_s (lm, sft) or samples_per_s (gru, classifier, asr) from
  summary.json;
- raised settings: every numeric setting in args.json (and the chosen micro-batch and effective
  batch) that is larger under --resource-efficient than in the standard run. Larger by design and
  not a failure: grad_accum (it doubles where the micro-batch halves; the effective batch is
  checked separately) and eval_every from 0 (epoch end only) to a step count. workers is listed as
  a note: a loader process's memory is not in the trainer's VmHWM, so this table does not see it.

A row passes when both memory ratios (added RSS, peak tensors) are <= 0.7, the speed ratio is
>= 0.4 and nothing was raised. Also shown, not judged: each mode's final metric (summary.json's
value), to see that the run still learns.

The default shapes are capped with --max-steps so each run takes about 1-2 min on one thread of a
shared 2-core machine (the memory figures do not need a whole run: the peak step is the largest
batch, which the first steps already see, plus one final evaluation):

    gru         default: 10,000 queries, 8 epochs           -> --max-steps 150 (of 1,128)
    classifier  default: built-in data, fasttext, 10 epochs -> --max-steps 150 (of 530)
    asr         default: preset optimized, 3,000 utterances -> --max-steps 12 (~5 s a step), the
                built-in set given as --train-manifest/--val-manifest (no test split: asr_manifests)
    lm          default: preset tiny, seq_len 256           -> --max-steps 15 (~4 s a step)
    sft         default: the seed's column, seq_len 2048    -> --max-steps 6 (~3 s a step)

The --quick shapes run as shipped, except sft (600 steps, ~10 min a run on a loaded core):
--max-steps 100, which still holds one evaluation (standard: every 100 steps; r-e: every 50);
--quick-max-steps N caps them all at N. Both sft shapes train on the built-in pairs given as
--data, with the test split cut to 16 pairs (see sft_pairs). The --measure-peak runs stop after
30 steps (PROFILED_STEPS): the tensor peak is a training step's, and only the plain runs' RSS and
speed need the whole (capped) run.

    python benchmarks/bench_resource_efficient.py                        # all 5 x 2 shapes, ~65 min on 2 busy cores
    python benchmarks/bench_resource_efficient.py --trainers sft --shapes quick
    python benchmarks/bench_resource_efficient.py --keep /tmp/re --json re.json --repeats 2

With --repeats N each figure is the median over the N runs of its mode. The table goes to stdout,
progress to stderr; exit 0 whatever the verdicts (a failed trainer run exits 1).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # the parent side the benchmarks share (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import pos_int  # noqa: E402  (the trainers' flag types)

# name -> (script, module, the speed field in summary.json, --max-steps for the default shape)
TRAINERS = {
    "gru": ("train_gru.py", "train_gru", "samples_per_s", 150),
    "classifier": ("train_classifier.py", "train_classifier", "samples_per_s", 150),
    "asr": ("train_asr.py", "train_asr", "samples_per_s", 12),
    "lm": ("train_lm.py", "train_lm", "tokens_per_s", 15),
    "sft": ("train_sft.py", "train_sft", "tokens_per_s", 6),
}
# --max-steps for the quick shape where the shipped one takes several minutes on a loaded core
QUICK_CAPS = {"sft": 100}
# --measure-peak runs stop here: the tensor peak is the largest micro-batch's step, and the first
# steps draw batches of every size the data has (the profiler reads only the largest-yet ones)
PROFILED_STEPS = 30
SFT_TEST = 16  # test pairs kept in the sft runs' --data (see sft_pairs)
SHAPES = ("quick", "default")
ASR_DEFAULT_N, SEED = 3000, 1337  # train_asr.py's default built-in set (3,000 utterances) and seed
MODES = ("standard", "resource-efficient")
MEM_MAX = 0.7     # r-e's added RSS and tensor peak at most 0.7x the standard run's
SPEED_MIN = 0.4   # r-e's throughput at least 0.4x the standard run's
# numeric settings --resource-efficient may raise: see the docstring
RAISED_BY_DESIGN = {"grad_accum"}
NOTE_ONLY = {"workers"}
LOADER = {"classifier", "lm", "sft"}  # the trainers with a DataLoader: elsewhere workers is read by nothing
# bookkeeping, not sizes: a different value says nothing about memory
IGNORED = {"seed", "identity", "max_download_mb"}

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--trainers", nargs="+", choices=list(TRAINERS), default=list(TRAINERS), metavar="NAME",
                    help="which trainers, in this order (default all: %(default)s)")
parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES),
                    help="quick = the trainer's --quick run; default = no --quick, capped by --max-steps "
                         "(default both)")
parser.add_argument("--repeats", type=pos_int, default=1, metavar="N",
                    help="runs per mode and shape; the order alternates, figures are medians")
parser.add_argument("--threads", type=pos_int, default=1, metavar="N",
                    help="OMP_NUM_THREADS for every run (1 leaves room for the rest of a shared machine)")
parser.add_argument("--default-max-steps", type=pos_int, default=None, metavar="N",
                    help="cap every default-shape run at N steps instead of the per-trainer caps above")
parser.add_argument("--quick-max-steps", type=pos_int, default=None, metavar="N",
                    help="cap every --quick run at N steps (default: as shipped, sft at 100)")
parser.add_argument("--keep", default=None, metavar="DIR",
                    help="keep the run folders in DIR/<trainer>-<shape>-<mode>-<repeat> (default: a temporary "
                         "folder, removed)")
parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")


# -----------------------------------------------------------------------------
# the runs

def bare_rss_mb(module, env):
    """(bare, runtime): peak RSS (VmHWM) in MB of a fresh process that only imports `module` from
    the repo root -- the fixed cost (Python, torch, the trainer's imports) that every run pays
    before it builds anything -- and of the same process once it has also built a
    torch.optim.AdamW on one tensor: torch 2.13's Optimizer.add_param_group imports torch._dynamo
    (and with it sympy) on first use, ~70 MB that every run of every trainer pays in both modes."""
    hwm = "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import {module}; {hwm}; import torch; "
            f"torch.optim.AdamW([torch.zeros(1, requires_grad=True)]); {hwm}")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: importing {module} failed:\n{out.stderr[-2000:]}")
    bare, runtime = (int(x) / 1024 for x in out.stdout.split()[-2:])
    return bare, runtime


def run_trainer(script, flags, out, config, env):
    """Run `python SCRIPT FLAGS --out OUT` from the repo root; returns (summary, args.json settings,
    args.json chosen, seconds), or None (its log's tail printed) when it fails."""
    out.mkdir(parents=True)
    cmd = [sys.executable, script, "--device", "cpu", "--precision", "fp32",
           "--config", str(config), "--out", str(out), *flags]
    t0 = time.perf_counter()
    with open(out / "stdout.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    secs = time.perf_counter() - t0
    if proc.returncode != 0 or not (out / "summary.json").exists():
        print((out / "stdout.log").read_text()[-3000:], file=sys.stderr)
        print(f"error: `{' '.join(cmd[1:])}` failed (exit {proc.returncode}); its output is above",
              file=sys.stderr)
        return None
    a = json.loads((out / "args.json").read_text())
    return (json.loads((out / "summary.json").read_text()), {k: v["value"] for k, v in a["settings"].items()},
            a["chosen"], secs)


# data a trainer writes under data/ on its first run: written here first, so that no measured run
# pays for it (the first of them would otherwise hold the writing in its peak RSS)
PREPARE = {
    "lm": "train_lm.builtin_corpus(print)",
    "asr": f"train_asr.synthetic_set('data', 800, {SEED})",  # --quick's set; the default's: asr_manifests
}


def prepare_data(name, env):
    if name in PREPARE:
        code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {TRAINERS[name][1]}; {PREPARE[name]}"
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def asr_manifests(env):
    """The default ASR run's built-in set (train_asr.py writes it once under data/) as manifest
    flags, train and val only: with the built-in set the run ends with a beam-search decode of its
    375 test utterances, one at a time, which for a model trained a few dozen steps (it never emits
    <eos>, so every search runs the whole utterance) takes 5+ minutes on a loaded CPU and holds the
    memory of one utterance: nothing this benchmark measures."""
    d = REPO / "data" / f"asr-synthetic-n{ASR_DEFAULT_N}-s{SEED}"
    if not all((d / f"{s}.jsonl").exists() for s in ("train", "val")):
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import train_asr; "
                f"train_asr.synthetic_set({str(REPO / 'data')!r}, {ASR_DEFAULT_N}, {SEED})")
        subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return ["--train-manifest", str(d / "train.jsonl"), "--val-manifest", str(d / "val.jsonl")]


def sft_pairs(path, env):
    """train_sft.py's built-in pairs as a --data file, with its test split (10 %, picked by
    train_sft.split_of) cut to SFT_TEST pairs: the run ends with a greedy decode of every test
    pair, 64 tokens each for a model that has not learned to stop, ~10 min of 370 pairs on a
    loaded core, in inference mode (no graph kept): nothing this benchmark measures. The train and
    validation pairs, which shape the memory, are the built-in ones."""
    code = (f"import sys, json; sys.path.insert(0, {str(REPO)!r}); import train_sft as S; "
            f"ps = S.builtin_pairs(); test = [p for p in ps if S.split_of(p) == 0][:{SFT_TEST}]; "
            f"keep = [p for p in ps if S.split_of(p) != 0] + test; "
            f"open({str(path)!r}, 'w').write(''.join(json.dumps(p) + chr(10) for p in keep))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return ["--data", str(path)]


def flags_for(name, shape, mode, args, extra, profiled=False):
    cap = ((args.quick_max_steps or QUICK_CAPS.get(name)) if shape == "quick"
           else (args.default_max_steps or TRAINERS[name][3]))
    if profiled:
        cap = min(cap or PROFILED_STEPS, PROFILED_STEPS)
    return ((["--quick"] if shape == "quick" else []) + (["--max-steps", str(cap)] if cap else [])
            + extra.get((name, shape), []) + (["--resource-efficient"] if mode == "resource-efficient" else []))


# -----------------------------------------------------------------------------
# what --resource-efficient changed

def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def raised_settings(std, re_, std_chosen, re_chosen, loader):
    """(fails, notes): the numeric settings larger under --resource-efficient, as 'key a -> b'."""
    fails, notes = [], []
    for key in sorted(set(std) & set(re_)):
        a, b = std[key], re_[key]
        if key in IGNORED or not (is_num(a) and is_num(b)) or b <= a or (key == "workers" and not loader):
            continue
        if key in RAISED_BY_DESIGN or (key == "eval_every" and a == 0):
            continue
        (notes if key in NOTE_ONLY else fails).append(f"{key} {a:g} -> {b:g}")
    for key in ("micro_batch", "effective_batch"):
        a, b = std_chosen.get(key), re_chosen.get(key)
        if is_num(a) and is_num(b) and b > a:
            fails.append(f"{key} {a} -> {b}")
    a, b = std_chosen.get("effective_batch"), re_chosen.get("effective_batch")
    if is_num(a) and is_num(b) and b < a:
        notes.append(f"effective batch {a} -> {b}")
    return fails, notes


# -----------------------------------------------------------------------------
# parent: every trainer, shape and mode, then the table

def main():
    args = parser.parse_args()
    work_tmp, work, config = benchlib.work_folders(args.keep, "bench_re-", {t[1].removeprefix("train_") for t in TRAINERS.values()})
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    busy, t_start, kids0 = benchlib.cpu_watch_start()
    bare, runtime = {}, {}
    for name in args.trainers:
        prepare_data(name, env)
        bare[name], runtime[name] = bare_rss_mb(TRAINERS[name][1], env)
        print(f"bare import of {TRAINERS[name][1]}: peak RSS {bare[name]:.1f} MB, {runtime[name]:.1f} MB with an "
              "AdamW built", file=sys.stderr, flush=True)

    extra = {("asr", "default"): asr_manifests(env)} if "asr" in args.trainers and "default" in args.shapes else {}
    if "sft" in args.trainers:
        extra[("sft", "quick")] = extra[("sft", "default")] = sft_pairs(Path(work_tmp.name) / "sft_pairs.jsonl", env)
    results = {}  # (name, shape) -> {mode: [run, ...]}
    n, total, failed = 0, len(args.trainers) * len(args.shapes) * 4 * args.repeats, False
    for name in args.trainers:
        script, _, speed_key, _ = TRAINERS[name]
        for shape in args.shapes:
            runs = results[(name, shape)] = {m: [] for m in MODES}
            for r in range(args.repeats):
                for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                    run = {}
                    for kind in ("plain", "profiled"):  # see the docstring: the profiler's own RSS
                        n += 1
                        got = run_trainer(script, flags_for(name, shape, mode, args, extra, kind == "profiled")
                                          + (["--measure-peak"] if kind == "profiled" else []),
                                          work / f"{name}-{shape}-{mode}-{kind}-{r}", config, env)
                        if got is None:
                            failed = True
                            break
                        s, settings, chosen, secs = got
                        run[kind] = {"summary": s, "settings": settings, "chosen": chosen, "secs": secs}
                        print(f"[{n}/{total}] {name:<10} {shape:<7} {mode:<18} {kind:<8} peak RSS "
                              f"{s['peak_mem_mb']:7.1f} MB (+{s['peak_mem_mb'] - runtime[name]:.1f}), tensors "
                              f"{s['peak_tensor_mb']} MB, {speed_key} {s.get(speed_key)}, micro-batch "
                              f"{chosen.get('micro_batch')} x {chosen.get('grad_accum')}, {s.get('steps')} steps "
                              f"({secs:.0f} s)", file=sys.stderr, flush=True)
                    if len(run) == 2:
                        runs[mode].append({**run["plain"], "secs": run["plain"]["secs"] + run["profiled"]["secs"],
                                           "peak_tensor_mb": run["profiled"]["summary"]["peak_tensor_mb"]})
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- the table
    rows, records, notes = [], [], []
    for (name, shape), runs in results.items():
        if not runs["standard"] or not runs["resource-efficient"]:
            rows.append((name, shape, "run failed", "", "", "", "", "", "ERROR"))
            continue
        speed_key = TRAINERS[name][2]

        def med(mode, f):
            return statistics.median(f(x) for x in runs[mode])
        fig = {}
        for mode in MODES:
            fig[mode] = {"added": med(mode, lambda x: x["summary"]["peak_mem_mb"] - runtime[name]),
                         "above_bare": med(mode, lambda x: x["summary"]["peak_mem_mb"] - bare[name]),
                         "value": med(mode, lambda x: x["summary"]["value"]),
                         "tensor": med(mode, lambda x: x["peak_tensor_mb"] or float("nan")),
                         "speed": med(mode, lambda x: x["summary"][speed_key])}
        s, e = fig["standard"], fig["resource-efficient"]
        r_rss, r_ten, r_spd = e["added"] / s["added"], e["tensor"] / s["tensor"], e["speed"] / s["speed"]
        r_bare = e["above_bare"] / s["above_bare"]
        std0, re0 = runs["standard"][0], runs["resource-efficient"][0]
        fails, setting_notes = raised_settings(std0["settings"], re0["settings"], std0["chosen"], re0["chosen"],
                                               name in LOADER)
        why = []
        if not r_rss <= MEM_MAX:
            why.append("RSS")
        if not r_ten <= MEM_MAX:
            why.append("tensors")
        if not r_spd >= SPEED_MIN:
            why.append("speed")
        if fails:
            why.append(f"raised {len(fails)} setting{'s' * (len(fails) > 1)}")
            notes.append(f"{name} {shape}: --resource-efficient raised {', '.join(fails)}")
        verdict = "pass" if not why else "FAIL: " + "; ".join(why)
        sc = lambda m: runs[m][0]["chosen"]  # noqa: E731
        rows.append((name, shape, f"{s['added']:.1f} -> {e['added']:.1f}", f"{r_rss:.2f}x",
                     f"{s['tensor']:.1f} -> {e['tensor']:.1f}", f"{r_ten:.2f}x",
                     f"{r_spd:.2f}x", f"{s['above_bare']:.1f} -> {e['above_bare']:.1f} ({r_bare:.2f}x)",
                     verdict))
        if setting_notes:
            notes.append(f"note: {name} {shape}: --resource-efficient also raised {', '.join(setting_notes)} "
                         "(a loader process's RSS is not counted in the trainer's own peak)")
        records.append({"trainer": name, "shape": shape, "bare_rss_mb": round(bare[name], 1),
                        "runtime_rss_mb": round(runtime[name], 1),
                        "above_bare_mb": {m: round(fig[m]["above_bare"], 1) for m in MODES},
                        "peak_rss_mb": {m: [x["summary"]["peak_mem_mb"] for x in runs[m]] for m in MODES},
                        "added_rss_mb": {m: round(fig[m]["added"], 1) for m in MODES},
                        "peak_tensor_mb": {m: fig[m]["tensor"] for m in MODES},
                        speed_key: {m: fig[m]["speed"] for m in MODES},
                        "micro_batch": {m: f"{sc(m).get('micro_batch')} x {sc(m).get('grad_accum')}" for m in MODES},
                        "memory_plan_mb": {m: runs[m][0]["summary"]["memory_plan_mb"] for m in MODES},
                        "metric": {m: fig[m]["value"] for m in MODES},
                        "ratios": {"added_rss": round(r_rss, 3), "above_bare": round(r_bare, 3),
                                   "peak_tensor": round(r_ten, 3),
                                   "speed": round(r_spd, 3)},
                        "raised": fails, "notes": setting_notes, "verdict": verdict,
                        "secs": {m: [round(x["secs"], 1) for x in runs[m]] for m in MODES}})

    import torch  # only now: the parent stays light while the trainers run
    res = {**benchlib.runtime_info(torch.device("cpu"), "fp32"), "threads": args.threads}
    benchlib.print_header("--resource-efficient: added memory and speed against the standard run", sys.argv,
                          res, busy, others)
    caps = ", ".join(f"{t} {args.default_max_steps or TRAINERS[t][3]}" for t in args.trainers)
    qcaps = ", ".join(f"{t} {args.quick_max_steps or QUICK_CAPS[t]}" for t in args.trainers
                      if args.quick_max_steps or t in QUICK_CAPS)
    print("workload: each trainer's `--quick` run" + (f" (--max-steps {qcaps})" if qcaps else "")
          + f" and its default run (no --quick; --max-steps {caps}), `--device cpu --precision fp32`, "
          f"standard and `--resource-efficient` (alternating), {args.repeats} run(s) each, each a fresh "
          "process; added RSS = peak RSS (VmHWM) - the torch runtime's: a bare process that imports train_X "
          "and builds an AdamW (torch 2.13 imports torch._dynamo and sympy there, in both modes: "
          + ", ".join(f"{t} {runtime[t]:.0f} MB" for t in args.trainers) + "); tensors = peak of live tensors "
          "in the largest step (torch profiler, in a second run with `--measure-peak`: the profiler's own "
          "records would count in RSS); speed = tokens/s (lm, sft) or samples/s, from the plain run; "
          "above a bare import = peak RSS - a process that only imports train_X ("
          + ", ".join(f"{t} {bare[t]:.0f} MB" for t in args.trainers) + "), shown, not judged\n")
    benchlib.print_table(("trainer", "shape", "added RSS std -> r-e MB", "ratio", "peak tensors std -> r-e MB",
                          "ratio", "speed ratio", "above a bare import MB (ratio)", "verdict"), rows)
    print()
    ok = sum(r[-1] == "pass" for r in rows)
    print(f"target: both memory ratios <= {MEM_MAX}x, speed >= {SPEED_MIN}x, no length or size raised: "
          f"{'PASS' if ok == len(rows) else 'FAIL'} ({ok} of {len(rows)} rows pass)  ")
    for rec in records:
        print(f"{rec['trainer']} {rec['shape']}: {rec['trainer']}'s metric {rec['metric']['standard']} -> "
              f"{rec['metric']['resource-efficient']}; micro-batch {rec['micro_batch']['standard']} -> "
              f"{rec['micro_batch']['resource-efficient']}; plan (MB) "
              + " -> ".join(", ".join(f"{k} {v}" for k, v in rec["memory_plan_mb"][m].items()) for m in MODES) + "  ")
    for line in notes:
        print(line + "  ")
    benchlib.print_footer(busy, others, wall)

    if args.json:
        Path(args.json).write_text(json.dumps({"rows": records, "threads": args.threads,
                                               "repeats": args.repeats}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    work_tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
