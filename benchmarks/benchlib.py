"""benchlib.py -- the pieces that the benchmarks (bench_gru, bench_classifier, bench_asr, bench_lm) share.

Every benchmark runs each measurement in a fresh worker process (the script re-invoked with
--worker NAME, printing one JSON line) and prints a markdown table for the README. This file holds
what they all do the same way: the worker's runtime fields (runtime_info), and on the parent side
starting a worker and reading its JSON line, measuring how much CPU other processes used, the
command/machine header lines, the table, the per-repeat lines and the footer. What each worker
measures stays in its script.

Plain functions with explicit arguments. Importing this file does not import torch (the parent
stays light while its workers are timed); runtime_info imports it inside the worker, and
print_header, through memory_optimizer, only once the workers are done.
"""

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def run_worker(script, name, flags):
    """Run `python SCRIPT --worker NAME FLAGS...` and return its last JSON line as a dict; on a
    failure, say which worker failed and exit with its code. Its stderr (progress, tracebacks)
    passes through. Called by bench_gru.py and bench_classifier.py for every repeat."""
    cmd = [sys.executable, str(script), "--worker", name, *flags]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr passes through
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(f"error: the {name} worker failed (exit {proc.returncode}); its output is above",
              file=sys.stderr)
        sys.exit(proc.returncode or 1)
    return json.loads(lines[-1])


def work_folders(keep, prefix, trainers):
    """(tmp, work, config) for a benchmark's runs: a TemporaryDirectory (the caller cleans it up), the run
    folders' root (--keep DIR, which must be empty: the trainers would resume the runs in it, else the
    temporary folder) and an empty optimal_config.json for `trainers` (each trainer's shipped settings)."""
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    work = Path(keep) if keep else Path(tmp.name)
    if keep and work.exists() and any(work.iterdir()):
        sys.exit(f"error: --keep {work} is not empty (the trainers would resume the runs in it); "
                 f"pick a new folder or delete it")
    work.mkdir(parents=True, exist_ok=True)
    config = Path(tmp.name) / "empty_config.json"
    config.write_text(json.dumps({"trainers": {t: {} for t in trainers}}))
    return tmp, work, config


def runtime_info(device, precision):
    """The worker's runtime as JSON fields: torch version, threads, device, device name,
    precision and whether the CPU lists bf16 units -- what print_header and
    print_precision_table read back. Imports torch and common (call it in workers only, with the
    repo root on sys.path). Called by every benchmark's worker."""
    import torch
    from common import cpu_has_bf16
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "precision": precision, "cpu_bf16": cpu_has_bf16()}


def fmt_ratio(a, b):
    """a / b as a table cell, e.g. '0.0123x'. Called by bench_gru.py and bench_classifier.py."""
    return f"{a / b:.3g}x"


def cpu_watch_start():
    """Start measuring other processes' CPU use; returns (busy, t_start, kids0) where busy is the
    percent of all CPU busy over a 1 s sample taken now. Other work on the machine slows the
    steps, so the report says how much CPU others used: a 1 s sample before (not the load
    average: it still remembers a run that just ended), and cpu_watch_end for the run itself.
    Called by bench_gru.py and bench_classifier.py just before their first worker."""
    busy = psutil.cpu_percent(interval=1.0)  # also primes the next cpu_percent(interval=None)
    return busy, time.perf_counter(), os.times()


def cpu_watch_end(t_start, kids0):
    """Finish what cpu_watch_start began; returns (wall, others): the run's wall time in seconds
    and the percent of all CPU that processes other than our workers used during it (all CPU busy
    time minus the finished children's CPU time), or None on Windows, where os.times has no
    children's times. Called by bench_gru.py and bench_classifier.py after their last worker."""
    wall = time.perf_counter() - t_start
    kids = os.times()
    ours = kids.children_user + kids.children_system - kids0.children_user - kids0.children_system
    others = psutil.cpu_percent(interval=None) - 100 * ours / (wall * os.cpu_count())
    others = max(0.0, others) if os.name != "nt" else None
    return wall, others


def print_header(title, argv, res, busy, others):
    """Print the report's title, `command:` and `machine:` lines (markdown, lines ending in two
    spaces so they break). res is one worker's JSON dict (torch version, threads, device,
    precision); busy and others come from cpu_watch_start/cpu_watch_end. The `workload:` line
    that follows differs per benchmark and stays in each script. The caller has put the repo root
    on sys.path (for memory_optimizer). Called by bench_gru.py and bench_classifier.py."""
    from memory_optimizer import cpu_model  # it imports torch: only now, after the workers ran
    cores = f"{os.cpu_count()} logical cores"
    phys = psutil.cpu_count(logical=False)
    if phys and phys != os.cpu_count():
        cores += f" ({phys} physical)"
    dev = res["device"] if res["device"] == "cpu" else f"{res['device']} ({res['device_name']})"
    print(f"## {title}\n")
    print(f"command: `python {shlex.join(argv)}`  ")
    print(f"machine: {cpu_model()}, {cores}, {psutil.virtual_memory().total / 2**30:.1f} GB RAM; "
          f"torch {res['torch']} ({res['threads']} threads); device {dev}, {res['precision']}; "
          f"other processes used {busy:.0f}% of the CPU before the run"
          + (f", ~{others:.0f}% during it  " if others is not None else "  "))


def print_table(header, rows):
    """Print a markdown table: the first column left-aligned, the others right-aligned (numbers),
    every column padded to its widest cell so the source reads as a table too. header and each
    row are sequences of strings of the same length. Called by bench_gru.py and
    bench_classifier.py."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|")
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        print("| " + " | ".join(cells) + " |")


def print_per_repeat(results):
    """Print each worker's samples/s per repeat, one line per name in results (a dict name ->
    list of worker JSON dicts, in run order). Called by bench_gru.py (always) and
    bench_classifier.py (with --repeats above 1)."""
    for name, runs in results.items():
        per = ", ".join(f"{r['samples_per_s']:.1f}" for r in runs)
        print(f"{name} samples/s per repeat: {per}  ")


def print_micro_bs_note(results, batch_size):
    """Print a note if any worker in results (name -> list of worker JSON dicts) ran out of
    memory and halved its micro-batch below batch_size (common.train_step does that and keeps the
    effective batch). Called by bench_gru.py and bench_classifier.py."""
    if any(r["micro_bs"] != batch_size for runs in results.values() for r in runs):
        print("note: a worker ran out of memory and halved its micro-batch (same effective batch)  ")


def print_footer(busy, others, wall):
    """The report's last lines: a note when other processes shared the CPU (busy/others from
    cpu_watch_start/cpu_watch_end), then the wall time. Called by bench_asr.py and bench_lm.py."""
    if max(busy, others or 0) >= 20:
        print("note: other processes shared the CPU with this run; re-run on an idle machine for the README  ")
    print(f"total wall time: {wall:.0f} s")


# -----------------------------------------------------------------------------
# --precision compare: every configuration in fp32 and in bf16 autocast, side by side

PRECISIONS = ("fp32", "bf16")


def precision_order(repeat):
    """fp32 then bf16 on even repeats, bf16 then fp32 on odd ones: a run just after another is
    not always the same precision's (caches, clocks, a neighbour that starts). Called by
    bench_gru.py, bench_classifier.py and bench_asr.py with --precision compare."""
    return PRECISIONS if repeat % 2 == 0 else PRECISIONS[::-1]


def precision_cells(runs, acc_key, acc_fmt):
    """One configuration's cells: fp32 and bf16 median samples/s, bf16 / fp32, and each
    precision's median accuracy figure (acc_fmt of it; 'n/a' where the worker measured none).
    runs: {"fp32": [worker dicts], "bf16": [...]}. Called by print_precision_table."""
    sps, acc = precision_medians(runs, acc_key)
    return [f"{sps['fp32']:.1f}", f"{sps['bf16']:.1f}", fmt_ratio(sps["bf16"], sps["fp32"]),
            *(acc_fmt(acc[p]) if acc[p] is not None else "n/a" for p in PRECISIONS)]


def precision_medians(runs, acc_key):
    """({precision: median samples/s}, {precision: median of acc_key, or None if not measured})
    over one configuration's repeats. Called by precision_cells and bench_classifier.py."""
    sps = {p: statistics.median(r["samples_per_s"] for r in runs[p]) for p in PRECISIONS}
    acc = {p: (statistics.median(r[acc_key] for r in runs[p]) if runs[p][0][acc_key] is not None else None)
           for p in PRECISIONS}
    return sps, acc


def print_precision_table(first_col, results, acc_label, acc_key, acc_fmt):
    """The --precision compare table: a row per configuration (results: name -> {"fp32": [worker
    dicts], "bf16": [...]}, in table order), then each run's samples/s per repeat. acc_label
    names the accuracy figure (e.g. "test accuracy"), acc_key its worker field. Called by
    bench_gru.py, bench_classifier.py and bench_asr.py."""
    header = [first_col, "fp32 samples/s", "bf16 samples/s", "bf16 / fp32", f"fp32 {acc_label}",
              f"bf16 {acc_label}"]
    print_table(header, [[name, *precision_cells(runs, acc_key, acc_fmt)] for name, runs in results.items()])
    print()
    first = next(iter(results.values()))["fp32"][0]
    if first["device"] == "cpu":  # without bf16 units autocast emulates bf16: expect it slower
        print("bf16 units on this CPU (avx512_bf16 or amx_bf16 in /proc/cpuinfo): "
              + ("yes  " if first["cpu_bf16"] else "no, bf16 is emulated  "))
    for name, runs in results.items():
        per = "; ".join(f"{p} " + ", ".join(f"{r['samples_per_s']:.1f}" for r in runs[p]) for p in PRECISIONS)
        print(f"{name} samples/s per repeat: {per}  ")


# -----------------------------------------------------------------------------
# real text nobody here wrote: Debian's package index (the apt lists on this machine)

APT_LISTS = "/var/lib/apt/lists"
SECTIONS = ("admin", "games", "graphics", "net", "science", "sound", "text", "web")


def debian_descriptions(sections=SECTIONS, per_section=400, seed=0, lists=APT_LISTS):
    """[(one-line description, section)] from the Debian package index that apt downloaded:
    the `Description:` first line of every package in `sections`, without library, -dev, -doc,
    -dbg, -data and -common packages (their descriptions are formulaic: "development files for
    ..."), each description once, then `per_section` per section drawn with random.Random(seed)
    from the sorted set, so the same index gives the same rows. The index is read with apt's own
    helper, which decompresses .lz4/.xz/.gz lists. Exits with one line if there is no index or a
    section has too few packages. Called by bench_classifier_real.py and bench_gru.py."""
    import glob
    import random
    import re
    # the release's own index, the largest list: -updates and -security hold only what they patched
    paths = sorted(glob.glob(f"{lists}/*_main_binary-*_Packages*"), key=os.path.getsize)
    if not paths:
        sys.exit(f"error: no Debian package index in {lists}; run `apt-get update` first")
    paths = paths[-1:]
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", paths[0]], check=True,
                          stdout=subprocess.PIPE).stdout.decode("utf-8", "replace")
    found = {s: set() for s in sections}
    for record in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in record.split("\n") if ": " in line and line[0] != " ")
        section = fields.get("Section", "").split("/")[-1]  # "contrib/games" -> "games"
        name = fields.get("Package", "")
        if section in found and "Description" in fields and not (
                name.startswith("lib") or re.search(r"-(dev|doc|dbg|dbgsym|data|common|l10n)$", name)):
            found[section].add(fields["Description"].strip())
    rows, rng = [], random.Random(seed)
    for s in sections:
        if len(found[s]) < per_section:
            sys.exit(f"error: section {s} has only {len(found[s])} usable packages in {paths[0]}; "
                     f"lower --per-section")
        rows += [(d, s) for d in rng.sample(sorted(found[s]), per_section)]
    return rows
