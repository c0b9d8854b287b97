"""soak.py -- kill the trainers at random moments and check that resuming is bit-exact.

    python benchmarks/soak.py --kills 50                          # all five trainers, ~15 min on 2 cores
    python benchmarks/soak.py --kills 2 --trainers gru --seed 1   # a look in ~30 s
    python benchmarks/soak.py --kills 50 --trainers lm,sft --out /tmp/soak   # keep the folders there

Every trainer promises: re-running the same command resumes from the newest checkpoint, and
because batches are a pure function of (seed, step), a resumed run ends exactly where an
uninterrupted one does. This script tests that promise the hard way. For each trainer it makes
one uninterrupted reference run of a tiny configuration (12 steps, a checkpoint every 2, one
thread). Then, trial after trial, it starts the same command in a fresh folder, kills the whole
process group with SIGKILL (kill -9: no handler runs, no file is closed) at a moment drawn
uniformly over the reference run's wall time (or over the latest trial run that finished before
its kill, as the machine's load changes), and re-runs the command until it finishes; a trial is
meant to be killed 1 to 3 times, and a run that finishes before its kill ends the trial. The kills land before the first checkpoint, between checkpoints
and in the middle of a checkpoint write (a *.tmp left in checkpoints/). Each trial is then
compared with its reference, exactly:
  - metrics.jsonl, record by record: losses, learning rates and validation figures (timings
    and memory readouts are left out: they differ from run to run by nature);
  - summary.json, every field but the timings (metric and value among them);
  - the final checkpoint's model tensors, with torch.equal.
Each trial goes to the trainer with the fewest kills so far, until --kills have landed (a kill
drawn after the run has already finished does not count). It prints one table row per trainer and
`soak: K of N trials bit-exact (M kills)`; exit 1 if any trial differs or a resume fails,
with its folder and the first difference. Exact trials' folders are deleted, the others kept.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# --quick with tiny shapes: each reference run takes 6-20 s on one thread. Batch size and
# accumulation are fixed so that no machine-dependent auto choice can differ between runs.
TINY = ["--quick", "--max-steps", "12", "--save-every", "2", "--eval-every", "4", "--log-every", "1",
        "--batch-size", "8", "--grad-accum", "2"]
TRAINERS = {
    "gru": ["train_gru.py"],
    "classifier": ["train_classifier.py"],
    "asr": ["train_asr.py", "--dataset-size", "200", "--beam", "1"],  # 25 test utterances, greedy
    "lm": ["train_lm.py", "--eval-tokens", "4096"],
    "sft": ["train_sft.py", "--data", "few.jsonl"],  # 124 pairs: the final test decoding takes seconds
}
# fields that measure the machine, not the training: never equal twice
TIMING = {"ms_per_step", "tokens_per_s", "samples_per_s", "mfu", "peak_mem_mb", "wall_s",
          "peak_tensor_mb"}  # measured on the steps this segment of the run saw: a resume sees others
ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def command(name, seed, out):
    """The trainer's command line for run folder `out`. Called by reference_run and trial."""
    script, *flags = TRAINERS[name]
    return [sys.executable, str(REPO / script), *flags, *TINY, "--seed", str(seed), "--out", str(out)]


def start(cmd, cwd, log):
    """Start cmd in its own process group (so one killpg reaches its data-loader workers too),
    appending its output to `log`. Called by reference_run and trial."""
    with open(log, "a") as f:
        return subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def make_fixtures(work, names):
    """The files a trainer's flags name: few.jsonl (every 30th built-in SFT pair, as in
    tests/test_golden_losses.py). Called once by main."""
    if "sft" in names:
        sys.path.insert(0, str(REPO))
        import train_sft
        (work / "sft").mkdir(parents=True, exist_ok=True)
        (work / "sft" / "few.jsonl").write_text(
            "".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))


def reference_run(name, seed, work):
    """The uninterrupted run: returns (its folder, its wall time in seconds: the first kill window). The trainer's cwd
    is work/<name>, shared with the trials, so data it prepares once (data/pydoc, the synthetic
    speech) is there before the first trial. Called by main."""
    cwd = work / name
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    p = start(command(name, seed, cwd / "reference"), cwd, cwd / "reference.log")
    if p.wait() != 0:
        sys.exit(f"error: the {name} reference run failed (exit {p.returncode}); see {cwd / 'reference.log'}")
    return cwd / "reference", time.monotonic() - t0


def trial(name, seed, out, kills, window, rng):
    """Run the command in `out`, SIGKILL it up to `kills` times at uniform(0, window) seconds
    after each start, then let the last re-run finish. Returns a dict: landed (kills that hit a
    live process), early (of them, before any step checkpoint existed), mid_save (a *.tmp in
    checkpoints/ at the kill), failed (an error text, or None), wall (seconds, when the first
    run finished before its kill: an uninterrupted run). Called by main."""
    cwd, log = out.parent, out.with_suffix(".log")
    done = {"landed": 0, "early": 0, "mid_save": 0, "failed": None, "wall": None}
    for attempt in range(kills + 1):
        t0 = time.monotonic()
        p = start(command(name, seed, out), cwd, log)
        try:
            p.wait(timeout=rng.uniform(0, window) if attempt < kills else 600)
        except subprocess.TimeoutExpired:
            if attempt == kills:  # the last run: nothing should take 600 s
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                done["failed"] = f"run {attempt + 1} did not finish in 600 s; see {log}"
                return done
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            done["landed"] += 1
            done["early"] += not any((out / "checkpoints").glob("ckpt_step*.pt"))
            done["mid_save"] += any((out / "checkpoints").glob("*.tmp"))
            continue
        if p.returncode != 0:
            done["failed"] = f"run {attempt + 1} (after {done['landed']} kills) exited {p.returncode}; see {log}"
        elif attempt == 0:
            done["wall"] = time.monotonic() - t0
        return done  # finished before the next kill was due
    return done


def records(run):
    """metrics.jsonl as dicts without the timing fields. Called by first_difference."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in TIMING} for l in lines if l.strip()]


def final_model(run):
    """(file name, model state_dict) of the newest step checkpoint. Called by first_difference."""
    newest = max((run / "checkpoints").glob("ckpt_step*.pt"), key=lambda p: int(p.stem.split("step")[1]))
    return newest.name, torch.load(newest, map_location="cpu", weights_only=True)["model"]


def first_difference(ref, run):
    """A line saying where run first differs from ref (metrics, summary, final weights), or
    None when they are the same to the bit. Called by main."""
    if not (run / "summary.json").is_file():
        return "no summary.json: the run never finished"
    a, b = records(ref), records(run)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"metrics.jsonl record {i + 1}: reference {x}, trial {y}"
    if len(a) != len(b):
        return f"metrics.jsonl: {len(a)} records in the reference, {len(b)} in the trial"
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    for k in sorted((set(sa) | set(sb)) - TIMING):
        if sa.get(k) != sb.get(k):
            return f"summary.json {k!r}: reference {sa.get(k)!r}, trial {sb.get(k)!r}"
    (na, ma), (nb, mb) = final_model(ref), final_model(run)
    if na != nb:
        return f"final checkpoint: reference {na}, trial {nb}"
    for k in ma:
        if k not in mb or not torch.equal(ma[k], mb[k]):
            return f"{nb}: model tensor {k!r} differs"
    if set(mb) != set(ma):
        return f"{nb}: model tensors {sorted(set(mb) - set(ma))} not in the reference"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50, help="SIGKILLs in all, dealt over the trainers (default 50)")
    ap.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated (default: all five)")
    ap.add_argument("--seed", type=int, default=0, help="the trainers' --seed, and the kill times' (default 0)")
    ap.add_argument("--out", default=None, help="working folder (default: a new one in the temp folder)")
    args = ap.parse_args()
    names = args.trainers.split(",")
    for n in names:
        if n not in TRAINERS:
            print(f"error: --trainers {n}: not one of {','.join(TRAINERS)}", file=sys.stderr)
            sys.exit(2)
    if args.kills < 1:
        print("error: --kills must be 1 or more", file=sys.stderr)
        sys.exit(2)
    work = Path(args.out or tempfile.mkdtemp(prefix="soak-")).resolve()
    rng, t0 = random.Random(args.seed), time.monotonic()
    print(f"soak: {args.kills} kills over {','.join(names)}; folders in {work}", file=sys.stderr)
    make_fixtures(work, names)

    refs, window = {}, {}
    for n in names:
        refs[n], window[n] = reference_run(n, args.seed, work)
        print(f"  {n}: reference run {window[n]:.1f} s", file=sys.stderr)

    rows = {n: {"trials": 0, "kills": 0, "early": 0, "mid_save": 0, "exact": 0, "not": 0} for n in names}
    failures, landed, i = [], 0, 0
    while landed < args.kills and i < 10 * args.kills:  # the cap ends it if kills never land
        n, i = min(names, key=lambda n: rows[n]["kills"]), i + 1  # the trainer with the fewest kills so far
        out = work / n / f"trial{i:03d}"
        done = trial(n, args.seed, out, min(rng.choice([1, 1, 2, 3]), args.kills - landed), window[n], rng)
        landed += done["landed"]
        # the machine's load changes: a run that outlived no kill gives the window for the next
        window[n] = done["wall"] or window[n]
        why = done["failed"] or first_difference(refs[n], out)
        row = rows[n]
        row["trials"] += 1
        for k in ("early", "mid_save"):
            row[k] += done[k]
        row["kills"] += done["landed"]
        row["exact" if why is None else "not"] += 1
        print(f"  {out.name} {n}: {done['landed']} kills, {'exact' if why is None else why}", file=sys.stderr)
        if why is None:
            shutil.rmtree(out)
            out.with_suffix(".log").unlink()
        else:
            failures.append((out, why))

    print("| trainer | trials | kills | kills before first checkpoint | kills mid-save | exact | not exact |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        print(f"| {n} | {r['trials']} | {r['kills']} | {r['early']} | {r['mid_save']} | {r['exact']} | {r['not']} |")
    for out, why in failures:
        print(f"NOT EXACT {out}: {why}")
    trials = sum(r["trials"] for r in rows.values())
    exact = sum(r["exact"] for r in rows.values())
    print(f"wall time {time.monotonic() - t0:.0f} s")
    print(f"soak: {exact} of {trials} trials bit-exact ({landed} kills)")
    sys.exit(1 if failures or landed < args.kills else 0)


if __name__ == "__main__":
    main()
