"""memory_optimizer.py -- what this machine can train, what holds its memory, a live view, and
the background-run manager the launchers (run.sh, start_training.bat) call.

It recommends; it never kills a process and never changes a trainer's settings behind your back
(`stop` only asks the run you name, or the newest running one, to save and exit).
The trainers read optimal_config.json (written by `config`) only for the flags you did not type,
and print which settings they took from it.

    python memory_optimizer.py profile                  # CPU, RAM, GPU, disk, versions
    python memory_optimizer.py profile --json           # the same as a JSON dict
    python memory_optimizer.py config                   # write optimal_config.json for all trainers
    python memory_optimizer.py config --quick --out quick_config.json   # batch sizes for --quick runs
    python memory_optimizer.py optimize --top 8         # free this process's caches, list big processes
    python memory_optimizer.py plan asr --preset minimal   # a trainer's memory plan, without training
    python memory_optimizer.py monitor --duration 600 --interval 5 --csv memory.csv

    python memory_optimizer.py start gru --quick        # a trainer, detached; prints run folder and PID
    python memory_optimizer.py status                   # table of runs under runs/ (and started elsewhere)
    python memory_optimizer.py monitor RUN              # one run's status every 5 s until it ends
    python memory_optimizer.py monitor --latest         # the same for the newest run
    python memory_optimizer.py stop [RUN]               # graceful: the trainer saves, then exits
"""

import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from common import (TRAINERS, HelpFormat, UserError, Parser, Typed, check_out_writable, cpu_has_bf16, free_memory,
                    native_bf16, pos_float, pos_int, read_status, run_main, table_batch_size,
                    write_json_atomic)

REPO = Path(__file__).resolve().parent

# Each trainer's default effective batch (samples per optimizer step). These must match the
# effective_batch each train_*.py passes to common.make_parser, so that batch_size x grad_accum
# here gives the same optimizer step the trainer would take on its own. sft is train_sft.py,
# split from train_lm.py's --task sft, which read the lm section: its section is the lm one.
EFFECTIVE_BATCH = {"gru": 64, "classifier": 16, "asr": 16, "lm": 32, "sft": 32}
ASR_MINIMAL_EFFECTIVE_BATCH = 8  # train_asr.py's EFFECTIVE_BATCH["minimal"] (not with --quick)

# The trainers' default --ram-threshold: above it they start freeing caches on every check,
# so it is also where `optimize` starts telling you to close something.
RAM_BUSY_PCT = 85.0
RAM_WARN_PCT = 70.0  # the --resource-efficient preset's threshold
BIG_PROCESS_MB = 500  # smaller processes are not worth closing for a training run


# -----------------------------------------------------------------------------
# profile

def list_runs(root="runs"):
    """[(run folder, status dict)] for every run under root and every folder listed in
    root/started.txt (where `start` records runs it launched with an --out elsewhere), newest
    first; each folder once, a gone one skipped, an unreadable status.json {}."""
    root = Path(root)
    try:
        started = (root / "started.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError:
        started = []
    runs, seen = [], set()
    for d in [p.parent for p in root.glob("*/status.json")] + [Path(line) for line in started if line]:
        if not (d / "status.json").is_file() or d.resolve() in seen:
            continue
        seen.add(d.resolve())
        runs.append((d, read_status(d)))
    return sorted(runs, key=lambda r: r[1]["started"] if isinstance(r[1].get("started"), (int, float)) else 0,
                  reverse=True)


def cpu_model():
    """The CPU's marketing name: train_lm.py's cpu_name, the key its MFU peak is looked up by."""
    from train_lm import cpu_name
    return cpu_name()


def machine_profile():
    """Probe this machine once; a plain dict of plain values. Called by `profile` and `config`
    (optimal_config.json embeds it, so a config copied to another machine shows where it came from).

    ram_total_gb and gpu_free_gb are left unrounded: recommend() feeds them to
    common.table_batch_size, whose bands (8 GB, 16 GB) must fall where the trainers' own
    call puts them.
    """
    vm = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    prof = {
        "cpu_model": cpu_model(),
        # psutil returns None where it cannot tell physical cores apart (some VMs, BSDs)
        "cpu_cores_physical": psutil.cpu_count(logical=False) or logical,
        "cpu_cores_logical": logical,
        "ram_total_gb": vm.total / 2**30,
        "ram_available_gb": round(vm.available / 2**30, 2),
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": None,
        "gpu_count": 0,
        "gpu_total_gb": None,
        "gpu_free_gb": None,
        "gpu_capability": None,
        "bf16_supported": False,
        "tf32_supported": False,
        "disk_free_gb": round(shutil.disk_usage(os.getcwd()).free / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    # MFU's denominator, measured once here (the best of many repeats at a few sizes) so every
    # run's MFU is against the same, stable figure; trainers measure it only without a config
    dev = torch.device("cuda", 0) if prof["cuda_available"] else torch.device("cpu")
    prof["cpu_bf16_units"] = cpu_has_bf16()
    from train_lm import matmul_peak  # MFU's denominator is the LM's; read here once for every run
    prof["matmul_peak"] = {"device": dev.type, "threads": torch.get_num_threads(),
                           "fp32_gflops": round(matmul_peak(dev, torch.float32) / 1e9, 1),
                           "bf16_gflops": round(matmul_peak(dev, torch.bfloat16) / 1e9, 1)}
    if prof["cuda_available"]:
        dev = torch.device("cuda", 0)  # the device a trainer's --device cuda uses
        props = torch.cuda.get_device_properties(dev)
        free, _ = torch.cuda.mem_get_info(dev)  # free now: other programs may hold part of the card
        prof.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_total_gb=round(props.total_memory / 2**30, 2),
            gpu_free_gb=free / 2**30,
            gpu_capability=f"{props.major}.{props.minor}",
            # native bf16 only (capability 8.0+): torch.cuda.is_bf16_supported() also says yes on
            # Turing/Pascal cards, where bf16 is emulated and slower than fp16, and its
            # including_emulation=False is missing before torch 2.5 (common.native_bf16)
            bf16_supported=native_bf16(dev),
            tf32_supported=props.major >= 8,  # TF32 tensor cores arrived with Ampere (sm_80)
        )
    return prof


PROFILE_ROWS = [  # (key, label, unit)
    ("cpu_model", "CPU", ""),
    ("cpu_cores_physical", "CPU cores (physical)", ""),
    ("cpu_cores_logical", "CPU cores (logical)", ""),
    ("ram_total_gb", "RAM total", "GB"),
    ("ram_available_gb", "RAM available", "GB"),
    ("cuda_available", "CUDA available", ""),
    ("gpu_name", "GPU", ""),
    ("gpu_count", "GPU count", ""),
    ("gpu_total_gb", "GPU memory total", "GB"),
    ("gpu_free_gb", "GPU memory free", "GB"),
    ("gpu_capability", "GPU compute capability", ""),
    ("bf16_supported", "bf16 (native)", ""),
    ("cpu_bf16_units", "CPU bf16 units (AMX/AVX-512)", ""),
    ("matmul_peak", "matmul peak (MFU's denominator)", ""),
    ("tf32_supported", "TF32 (capability >= 8)", ""),
    ("disk_free_gb", "disk free here", "GB"),
    ("os", "OS", ""),
    ("python", "python", ""),
    ("torch", "torch", ""),
]


def _fmt(value, unit=""):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f} {unit}".strip()
    if isinstance(value, dict) and "fp32_gflops" in value:
        return (f"fp32 {value['fp32_gflops']:,.0f}, bf16 {value['bf16_gflops']:,.0f} GFLOP/s "
                f"({value['device']}, {value['threads']} threads)")
    return f"{value} {unit}".strip()


def profile_table(prof):
    width = max(len(label) for _, label, _ in PROFILE_ROWS)
    return "\n".join(f"{label:<{width}}  {_fmt(prof.get(key), unit)}" for key, label, unit in PROFILE_ROWS)


def cmd_profile(args):
    prof = machine_profile()
    print(json.dumps(prof, indent=2) if args.json else profile_table(prof))
    return 0


# -----------------------------------------------------------------------------
# config: optimal_config.json

def _entry(value, reason):
    return {"value": value, "reason": reason}


def recommend(profile, quick):
    """The per-trainer settings for a machine described by `profile` (a machine_profile() dict).

    Pure: no probing, so tests can pass made-up machines. Returns {trainer: {dest: {"value",
    "reason"}}}; each key is the argparse dest of a trainer flag (common.resolve_settings applies
    an entry only when the user did not type that flag). Called by `config`.
    """
    cuda = bool(profile.get("cuda_available"))
    ram_gb = profile["ram_total_gb"]
    gpu_free = profile.get("gpu_free_gb") if cuda else None
    cores = profile.get("cpu_cores_logical") or 1

    # the same table the trainers start their batch probe from, so config and auto agree
    bs, bs_why = table_batch_size("cuda" if cuda else "cpu", quick, free_gpu_gb=gpu_free, ram_gb=ram_gb)
    # both columns of the table: a trainer run with --quick takes quick_value
    qbs, _ = table_batch_size("cuda" if cuda else "cpu", True, free_gpu_gb=gpu_free, ram_gb=ram_gb)
    batch = dict(_entry(bs, f"{bs_why}; the trainer's probe is skipped when this value is used"), quick_value=qbs)

    if cuda and profile.get("bf16_supported"):
        precision = _entry("bf16", "the GPU has native bf16: half the activation memory with "
                                   "fp32's exponent range, so no loss scaling")
    elif cuda:
        precision = _entry("fp16", "the GPU has no native bf16: fp16 autocast with a GradScaler "
                                   "halves activation memory")
    else:
        precision = None  # CPU: no entry; each trainer times its own step in fp32 and bf16 (--precision auto)

    if cuda:
        n = min(4, cores)
        workers = _entry(n, f"CUDA: {n} loader processes (of {cores} cores) prepare batches while "
                            "the GPU computes")
        pin = _entry(True, "CUDA: page-locked batches copy to the GPU asynchronously")
    else:
        n = min(2, max(1, cores // 2))
        workers = _entry(n, f"CPU: the model's math needs most of the {cores} cores, so only "
                            f"{n} loader process{'es' if n > 1 else ''}")
        pin = _entry(False, "CPU: pinned memory only speeds up copies to a GPU")

    small_gpu = not cuda or gpu_free < 4
    presets = {
        "gru": _entry("optimized", "the original 3-layer GRU-MN has ~48M parameters and needs "
                                   "several GB for its AdamW state; the optimized preset fits small machines"),
        # measured on 3,200 real rows (docs/classifier.md): fasttext + TF-IDF linear SVM 0.785 in ~20 s; the small
        # transformer from scratch 0.6 in ~5; a bigger random encoder only needs more data
        "classifier": _entry("fasttext", "small data (thousands of rows) is learnt best by fasttext, on any "
                                         "machine; with a pretrained checkpoint, pass --pretrained DIR"),
        # --quick keeps train_asr.py's tiny model: the demo's point is minutes, not accuracy
        "asr": dict(_entry("minimal", "CPU: the minimal model keeps a CPU run to minutes" if not cuda else
                           f"only {gpu_free:.1f} GB free on the GPU: the minimal model is the one sized "
                           "for under 4 GB")
                    if small_gpu else
                    _entry("optimized", f"{gpu_free:.1f} GB free on the GPU is enough for the optimized model"),
                    quick_value="tiny"),
        "lm": (_entry("small", "GPU: the small model; the tiny one would leave the GPU mostly idle")
               if cuda else _entry("tiny", "CPU: the tiny model is the one sized for CPU training")),
    }
    presets["sft"] = presets["lm"]
    if not cuda:
        lm_len = dict(_entry(256, "CPU: attention cost grows with the square of the sequence length"),
                      quick_value=64)  # what train_lm.py --quick uses on its own
    elif gpu_free < 8:
        lm_len = _entry(1024, f"only {gpu_free:.1f} GB free on the GPU: 1024 tokens keep activations small")
    else:
        lm_len = _entry(2048, f"{gpu_free:.1f} GB free on the GPU holds 2048-token sequences")

    out = {}
    for name, effective in EFFECTIVE_BATCH.items():
        quick_effective = effective
        if name == "asr" and presets["asr"]["value"] == "minimal":
            effective = ASR_MINIMAL_EFFECTIVE_BATCH
        accum = max(1, math.ceil(effective / bs))
        got = bs * accum
        why = f"{bs} x {accum} = {got} samples per optimizer step"
        why += (", the trainer's effective batch" if got == effective else
                f" (the trainer's effective batch is {effective}; {bs} does not divide it)" if got > bs else
                f" (the micro-batch alone exceeds the trainer's effective batch of {effective})")
        t = {"batch_size": batch, "grad_accum": dict(_entry(accum, why),
                                                      quick_value=max(1, math.ceil(quick_effective / qbs)))}
        if precision:
            t["precision"] = precision
        if name in ("classifier", "lm", "sft"):  # the trainers with a DataLoader: the GRU and ASR read neither
            t["workers"] = workers
            t["pin_memory"] = pin
        if name == "classifier":
            t["max_len"] = _entry(64, "64 tokens keep activation memory small on any machine; "
                                      "raise it for long texts")
        if name in ("lm", "sft"):
            t["seq_len"] = lm_len
        t["preset"] = presets[name]  # every trainer's model-size flag is --preset
        out[name] = t
    return out


def _check_writable(path, flag):
    """Fail before any probing if `path` cannot be written (exit 2 with what to do)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file path such as {path / 'file'}")
    parent = path.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: folder {parent} does not exist; create it or pick another {flag}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{flag} {path}: not writable; pick another {flag}")


def cmd_config(args):
    out = Path(args.out)
    _check_writable(out, "--out")
    prof = machine_profile()
    rec = recommend(prof, args.quick)
    cfg = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "machine": prof,
           "trainers": rec}
    try:
        write_json_atomic(out, cfg)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror}); pick another --out")

    rows = [(t, k, json.dumps(e["value"]), e["reason"]) for t, s in rec.items() for k, e in s.items()]
    w = [max(len(r[i]) for r in rows + [("trainer", "setting", "value", "")]) for i in range(3)]
    print(f"{'trainer':<{w[0]}}  {'setting':<{w[1]}}  {'value':<{w[2]}}  reason")
    for t, k, v, why in rows:
        print(f"{t:<{w[0]}}  {k:<{w[1]}}  {v:<{w[2]}}  {why}")
    print(f"\nwrote {out}")
    how = ("Trainers started in this folder read it" if Path(out).resolve() == Path("optimal_config.json").resolve()
           else f"Trainers read it with --config {out}")
    print(f"{how} for every flag you do not type, and say which settings they took; regenerate it when the "
          "hardware changes.")
    return 0


def apply_config(args, sources, reader, path):
    """The trainers' side of `config` (common.resolve_settings, when the file exists): each setting of path's
    trainers.<trainer> section that is still at its default goes into args, checked as if typed (reader:
    common.flag_reader), its source "optimal_config.json". Returns the keys set."""
    applied = []
    try:
        cfg = json.loads(path.read_text())
        section = cfg["trainers"][args.trainer]
        section.items()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        why = (e.strerror if isinstance(e, OSError) else f"not JSON: {e}" if isinstance(e, ValueError) else
               f"no trainers.{args.trainer} section")
        raise UserError(f"--config {path}: not a valid optimal_config.json ({why}); "
                        "regenerate it with `python memory_optimizer.py config`")
    for key, entry in section.items():
        if key in sources and sources[key] == "default":
            value = entry
            try:  # the same checks as a typed flag
                if isinstance(entry, dict):
                    value = entry.get("quick_value", entry["value"]) if args.quick else entry["value"]
                value = config_value(reader, key, value)
            except (KeyError, ValueError) as e:
                why = "an entry without a \"value\"" if isinstance(e, KeyError) else e
                raise UserError(f"--config {path}: {args.trainer}.{key} = {value!r} is invalid "
                                f"({why}); regenerate it with `python memory_optimizer.py config`")
            setattr(args, key, value)
            sources[key] = "optimal_config.json"
            applied.append(key)
    return applied


def config_value(reader, key, value):
    """An optimal_config.json value, checked and converted as if typed as --key-with-dashes (a
    setting without such a flag is returned as it is); ValueError for one the flag refuses."""
    flag = "--" + key.replace("_", "-")
    try:
        typed, rest = reader.parse_known_args([flag, str(value)], namespace=Typed())
    except argparse.ArgumentError as e:
        if (e.argument_name or "").split("/")[0] == flag:  # the error names the action's flags, main one first
            # the type's own words (argparse keeps its exception as the context), as for a typed flag
            choices = re.fullmatch(r"invalid choice: .* \(choose from (.*)\)", e.message)
            raise ValueError("not one of " + choices[1].replace("'", "") if choices else
                             str(e.__context__ or e.message))
        return value  # --key-with-dashes is another dest's alias (train_classifier.py's old --model)
    if key not in vars(typed) or rest:
        return value
    got = vars(typed)[key]
    # a flag without a type (a path) gives back str(value): keep the value as the config wrote it
    return value if got in (str(value), [str(value)]) else got


# -----------------------------------------------------------------------------
# optimize: free what this process can, report the rest, recommend

def top_processes(n):
    """[(rss_mb, pid, name, cmdline)] of the n processes with the largest resident memory.
    Processes that exit while we look, or that belong to users we may not read, are skipped."""
    procs = []
    for p in psutil.process_iter():
        try:
            with p.oneshot():
                rss_mb = p.memory_info().rss / 2**20
                name = p.name()
                try:
                    cmd = " ".join(" ".join(p.cmdline()).split())  # one line: a `python -c` script has newlines
                except (psutil.AccessDenied, psutil.ZombieProcess):
                    cmd = ""  # the memory figure is still worth showing
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        procs.append((rss_mb, p.pid, name, cmd))
    return sorted(procs, reverse=True)[:n]


def cmd_optimize(args):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    me = psutil.Process()
    before = me.memory_info().rss
    # This process has just started, so this frees little; it is the same cleanup the trainers
    # run when over their thresholds, and other processes' memory is theirs to free.
    free_memory(dev)
    freed = max(0, before - me.memory_info().rss) / 2**20
    print(f"freed {freed:.0f} MB in this process (Python garbage"
          f"{' and the CUDA cache' if dev.type == 'cuda' else ''}); other processes are untouched")

    vm = psutil.virtual_memory()
    print(f"\nRAM: {vm.total / 2**30:.1f} GB total, {vm.available / 2**30:.1f} GB available, "
          f"{vm.percent:.0f}% used")
    gpu_free_mb = None
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        gpu_free_mb = free / 2**20
        print(f"GPU: {torch.cuda.get_device_name(dev)}, {gpu_free_mb:.0f} MB free of {total / 2**20:.0f} MB")

    top = top_processes(args.top)
    print(f"\ntop {len(top)} processes by resident memory (RSS):")
    print(f"{'pid':>7}  {'name':<20}  {'RSS MB':>8}  command")
    for rss_mb, pid, name, cmd in top:
        print(f"{pid:>7}  {name[:20]:<20}  {rss_mb:>8.0f}  {cmd[:70] + ('...' if len(cmd) > 70 else '')}")

    advice = []
    if vm.percent >= RAM_BUSY_PCT:
        advice.append(f"RAM is {vm.percent:.0f}% used: close some programs below, or train with "
                      "--resource-efficient (smaller micro-batches, lower thresholds)")
    elif vm.percent >= RAM_WARN_PCT:
        advice.append(f"RAM is {vm.percent:.0f}% used: fine for --quick runs; for long runs close "
                      "something below or use --resource-efficient")
    else:
        advice.append(f"RAM is {vm.percent:.0f}% used: enough headroom, nothing needs closing")
    for rss_mb, pid, name, cmd in top:
        script = next((s for s in TRAINERS.values() if s in cmd), None)
        if script:
            advice.append(f"pid {pid} is a lean-train trainer ({script}, {rss_mb:.0f} MB): stop it "
                          "gracefully with `python memory_optimizer.py stop`, which saves a checkpoint first")
        elif vm.percent >= RAM_WARN_PCT and pid != me.pid and rss_mb >= BIG_PROCESS_MB:
            advice.append(f"close {name} (pid {pid}) if you do not need it: frees about {rss_mb:.0f} MB")
    if gpu_free_mb is not None and gpu_free_mb < 1024:
        advice.append(f"only {gpu_free_mb:.0f} MB free on the GPU: another program holds it "
                      "(`nvidia-smi` shows which); close it, or train with --device cpu")

    print("\nrecommendations:")
    for line in advice:
        print(f"  - {line}")
    print("\nNothing was closed: memory_optimizer.py never kills a process, it only recommends.")
    return 0


# -----------------------------------------------------------------------------
# monitor: one row every --interval seconds

CSV_COLUMNS = ["time", "ram_pct", "ram_avail_gb", "cpu_pct", "gpu_used_mb", "gpu_total_mb", "running_runs"]


def running_summary(runs):
    """'run step/total loss L; ...' for the runs (list_runs output) whose trainer is alive and
    running, '-' when there are none. Called by monitor for every row."""
    parts = []
    for run_dir, st in runs:
        if shown_state(st, run_dir) != "running":
            continue
        loss = st.get("loss")
        loss = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
        parts.append(f"{run_dir.name} {st.get('step', 0)}/{st.get('total_steps') or '?'} loss {loss}")
    return "; ".join(parts) or "-"


def monitor_sample(runs_dir, cuda):
    """One row: system RAM, system-wide CPU % since the previous call, GPU use, running runs."""
    vm = psutil.virtual_memory()
    row = {"time": datetime.datetime.now().isoformat(timespec="seconds"),
           "ram_pct": vm.percent,
           "ram_avail_gb": round(vm.available / 2**30, 2),
           "cpu_pct": psutil.cpu_percent(interval=None),
           "gpu_used_mb": None, "gpu_total_mb": None,
           "running_runs": running_summary(list_runs(runs_dir))}
    if cuda:
        # device-wide (every process on the card), unlike memory_allocated, which sees only ours
        free, total = torch.cuda.mem_get_info()
        row["gpu_used_mb"] = round((total - free) / 2**20)
        row["gpu_total_mb"] = round(total / 2**20)
    return row


def cmd_monitor(args):
    if args.run or args.latest:
        if args.duration is not None or args.csv:
            raise UserError("--duration/--csv are for the machine monitor; with RUN or --latest the "
                            "monitor follows one run until it ends")
        return monitor_run(args.run, args.runs, args.interval or 5.0)
    args.duration = 60.0 if args.duration is None else args.duration
    args.interval = args.interval or 2.0
    f = writer = None
    if args.csv:
        path = Path(args.csv)
        _check_writable(path, "--csv")
        try:
            f = open(path, "a", newline="")
        except OSError as e:
            raise UserError(f"--csv {path}: cannot write it ({e.strerror}); pick another --csv")
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if f.tell() == 0:  # appending to an earlier log keeps its single header
            writer.writeheader()

    # mem_get_info creates a CUDA context in this process, a few hundred MB of the card: on a
    # 4 GB GPU start the monitor before the trainer, so the trainer's batch probe sees it.
    cuda = torch.cuda.is_available()
    gpu_head = f" {'GPU used/total MB':>18}" if cuda else ""
    print(f"{'time':<8} {'RAM %':>6} {'avail GB':>9} {'CPU %':>6}{gpu_head}  running runs "
          f"(under {args.runs}/)", flush=True)
    psutil.cpu_percent(interval=None)  # the first call only starts the CPU clock; rows measure from here
    # Rows at interval, 2*interval, ... and a last one at --duration: each row's CPU % covers the
    # time since the previous row.
    n_rows = max(1, math.ceil(args.duration / args.interval - 1e-9))
    t0 = time.monotonic()
    try:
        for k in range(1, n_rows + 1):
            time.sleep(max(0.0, t0 + min(k * args.interval, args.duration) - time.monotonic()))
            row = monitor_sample(args.runs, cuda)
            gpu = f" {row['gpu_used_mb']:>8}/{row['gpu_total_mb']:<9}" if cuda else ""
            print(f"{row['time'][11:19]:<8} {row['ram_pct']:>6.1f} {row['ram_avail_gb']:>9.2f} "
                  f"{row['cpu_pct']:>6.1f}{gpu}  {row['running_runs']}", flush=True)
            if writer:
                writer.writerow(row)
                f.flush()  # a Ctrl-C or a crash keeps every row written so far
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)")
    finally:
        if f:
            f.close()
    if args.csv:
        print(f"rows appended to {args.csv}")
    return 0


# -----------------------------------------------------------------------------
# background runs: start / status / monitor RUN / stop (run.sh and start_training.bat call these)

def copy_of(out, status):
    """The run folder status.json belongs to when it is not `out` (a copied run folder), else None."""
    theirs = status.get("out")
    return theirs if isinstance(theirs, str) and Path(theirs).resolve() != Path(out).resolve() else None


def process_is_trainer(status):
    """True if status['pid'] is alive and is the trainer of status['out']: a python process made
    when status['pid_created'] says (a recycled PID has another), running the trainer's script,
    whose --out (if given) is that folder. `stop` signals only such a pid."""
    pid, created, out = status.get("pid"), status.get("pid_created"), status.get("out")
    script = TRAINERS.get(status.get("trainer"))
    if not (isinstance(pid, int) and isinstance(created, (int, float)) and isinstance(out, str) and script):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() - created) > 1:
            return False
        argv = proc.cmdline()
        if not argv or "python" not in (proc.name() + " " + Path(argv[0]).name).lower() \
                or not any(Path(a).name == script for a in argv[1:]):
            return False
        outs = [a[len("--out="):] if a != "--out" else b for a, b in zip(argv, argv[1:] + [""])
                if a == "--out" or a.startswith("--out=")]
        # the last --out is the one argparse keeps
        return all((Path(proc.cwd()) / o).resolve() == Path(out).resolve() for o in outs[-1:])
    except (psutil.Error, ValueError, OverflowError):
        return False


def shown_state(status, out):
    """Run folder `out`'s state for display: "dead" when status.json says it is running but its
    trainer is gone, "copy" when it says running but belongs to another folder (a copy names the
    original's pid, which must not be taken for this folder's), "corrupt" when unreadable."""
    if not status:
        return "corrupt"
    state = status.get("state", "?")
    if state in ("starting", "running") and copy_of(out, status):
        return "copy"
    if state in ("starting", "running") and not process_is_trainer(status):
        return "dead"  # killed or crashed without saying so; re-run the same command to resume
    return state


def fmt_eta(s):
    """Seconds as H:MM:SS, "-" for unknown."""
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def status_table(runs):
    """The `status` table: one line per run (list_runs output)."""
    head = f"{'run':<32} {'trainer':<10} {'state':<9} {'step':>13} {'loss':>8} {'metric':>18} {'ETA':>8} {'pid':>7}"
    lines = [head, "-" * len(head)]
    for run, st in runs:
        metric = f"{st.get('metric_name', '')}={st['metric']:.4g}" if st.get("metric") is not None else "-"
        loss = f"{st['loss']:.4f}" if st.get("loss") is not None else "-"
        state = shown_state(st, run)
        lines.append(f"{run.name[:32]:<32} {st.get('trainer', '?'):<10} {state:<9} "
                     f"{st.get('step', 0):>6}/{st.get('total_steps') or '?':<6} {loss:>8} {metric:>18} "
                     f"{fmt_eta(st.get('eta_s') if state == 'running' else None):>8} "
                     f"{st.get('pid', '-'):>7}")
    return "\n".join(lines)


def pick_run(root, run, running_only=False):
    """(folder, status) of RUN (a folder, or a name under root), else the newest (running) run
    (list_runs: under root or recorded in root/started.txt). Called by stop and monitor."""
    if run:
        p = Path(run)
        if not (p / "status.json").exists():
            p = Path(root) / run
        if not (p / "status.json").exists():
            raise UserError(f"{run}: no status.json there; `python memory_optimizer.py status` lists the runs")
        st = read_status(p)
        if not st:
            raise UserError(f"{p / 'status.json'}: unreadable (not a UTF-8 JSON object); no trainer can be "
                            f"found from it -- re-run the trainer with --out {p} to write a new one")
        if shown_state(st, p) == "copy":
            raise UserError(f"{p} is a copy of the run folder {st['out']} (its status.json is that run's); "
                            f"nothing runs here -- use {st['out']} itself")
        return p, st
    runs = [r for r in list_runs(root) if shown_state(r[1], r[0]) not in ("corrupt", "copy")]
    if running_only:
        runs = [r for r in runs if shown_state(r[1], r[0]) in ("starting", "running")]
    if not runs:
        raise UserError(f"no {'running ' if running_only else ''}run under {root}/")
    return runs[0]


def own_pids(pid):
    """pid and its descendants: on Windows a venv's python.exe is a launcher that runs the real
    interpreter as its child, so the trainer's pid in status.json is not the one Popen returned."""
    try:
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    except psutil.Error:
        return {pid}


def unfinished_start(trainer, flags, root):
    """The newest run under root that `start TRAINER flags` began (args.json's argv: these flags and
    its --out) and did not finish, that no live process trains: where the same start goes on."""
    runs = []
    for d in Path(root).glob("*"):
        st = read_status(d)
        try:
            argv = json.loads((d / "args.json").read_text())["argv"][1:]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if (st.get("trainer") == trainer and st.get("state") not in ("finished", "planned")
                and argv == [*flags, "--out", str(d)] and isinstance(st.get("started"), float)
                and not (st.get("state") in ("starting", "running") and process_is_trainer(st))):
            runs.append((st["started"], d))
    return max(runs)[1] if runs else None


def start_background(trainer, flags, root="runs", nproc=1):
    """Start a trainer detached from this terminal; output goes to <out>/console.log. A run
    folder outside root is recorded in root/started.txt, where list_runs finds it.
    nproc > 1: under torchrun on this machine (`python -m torch.distributed.run --standalone
    --nproc_per_node N`); status.json then names the rank-0 worker, a descendant of torchrun, and
    `stop` signals it: the trainer's loop stops every rank at the same step.
    Called by `start`."""
    if trainer not in TRAINERS:
        raise UserError(f"unknown trainer '{trainer}'; choose from {', '.join(TRAINERS)}")
    script = REPO / TRAINERS[trainer]
    if not script.exists():
        raise UserError(f"{script.name} is not in this checkout yet")
    out = None
    for i, a in enumerate(flags):
        if a == "--out" and i + 1 < len(flags):
            out = Path(flags[i + 1])
        elif a.startswith("--out="):
            out = Path(a.split("=", 1)[1])
    if out is None:  # as a trainer run without --out: the same command's unfinished run, else a new folder
        out = None if "--no-resume" in flags else unfinished_start(trainer, flags, root)
        out = out or Path(root) / f"{trainer}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        flags = [*flags, "--out", str(out)]
    check_out_writable(out)
    old = read_status(out)
    if shown_state(old, out) in ("starting", "running"):
        raise UserError(f"{out} is already being trained by pid {old['pid']}; "
                        f"`python memory_optimizer.py stop {out}` first")
    # what this start makes, so that a trainer refusing its flags leaves no trace (deepest first)
    created = [d for d in (out, *out.parents) if not d.exists()]
    console_path = out / "console.log"
    new_console = not console_path.exists()
    out.mkdir(parents=True, exist_ok=True)
    kw = {}
    if os.name == "nt":  # no console to close, its own process group for CTRL_BREAK
        kw["creationflags"] = subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kw["start_new_session"] = True  # survives closing the terminal (no SIGHUP)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(console_path, "ab") as console:  # the trainer keeps its own handle
        begin = console.tell()
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        proc = subprocess.Popen([*launch, str(script), *flags], stdout=console,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=os.getcwd(),
                                env=env, **kw)
    # wait until the trainer has validated its flags and data and claimed the run folder, so a
    # user mistake is reported here (exit 2), not hidden in console.log
    t0 = time.monotonic()
    while True:
        exited = proc.poll() is not None  # before reading the claim: an exit then means unclaimed
        claimed = read_status(out).get("pid") in own_pids(proc.pid)
        if claimed or exited or time.monotonic() - t0 > 120:
            break
        time.sleep(0.2)
    if exited and (proc.returncode or not claimed):
        lines = console_path.read_bytes()[begin:].decode(errors="replace").strip().splitlines()
        print("\n".join(lines[-20:] if proc.returncode else lines) or "(no output)", file=sys.stderr)
        where = f"; full output in {console_path}"
        if not claimed:  # it stopped before touching the folder: remove what start made, no more
            if new_console:
                console_path.unlink(missing_ok=True)
                where = ""
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break  # not empty: it holds something this start did not make
        print(f"the {trainer} trainer exited with code {proc.returncode}{where}", file=sys.stderr)
        sys.exit(proc.returncode)
    register_run(out, Path(root))
    pid = read_status(out).get("pid", proc.pid)  # the trainer's own (see own_pids)
    print(f"started {trainer} in the background: run folder {out}, pid {pid}")
    print(f"  watch it:  ./run.sh monitor {out}      stop it:  ./run.sh stop {out}")
    return out, pid


def register_run(out, root):
    """Append out to root/started.txt (once), so that status/monitor/stop --runs root list a run
    whose --out is elsewhere (list_runs reads it). Called by start_background."""
    if out.resolve().parent == root.resolve():
        return  # found under root anyway
    reg = root / "started.txt"
    try:
        known = reg.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if reg.exists() else []
        if str(out.resolve()) not in known:
            root.mkdir(parents=True, exist_ok=True)
            with open(reg, "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(f"{out.resolve()}\n")
    except OSError as e:
        print(f"warning: {reg}: cannot record the run there ({e.strerror}); name {out} to status/monitor/stop",
              file=sys.stderr)


def stop_run(run, root="runs", timeout=60.0):
    """Ask a run to stop: STOP file + SIGTERM (CTRL_BREAK on Windows), after checking that the
    PID really is that trainer (process_is_trainer: pid, create time, script, --out; never
    for a copied run folder, see pick_run). Waits until the trainer has saved and exited."""
    out, st = pick_run(root, run, running_only=run is None)
    if st.get("state") not in ("starting", "running"):
        print(f"{out}: not running (state {st.get('state')})")
        return 0
    if not process_is_trainer(st):
        raise UserError(f"{out}: pid {st.get('pid')} is not this run's trainer (it died, or status.json "
                        "cannot prove the pid is it); nothing signalled -- re-run the same command to resume")
    (out / "STOP").write_text("stop requested\n")
    try:
        os.kill(st["pid"], signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)
    except OSError:
        pass  # the STOP file alone is enough
    print(f"stop requested for {out} (pid {st['pid']}); waiting for it to save...")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if not psutil.Process(st["pid"]).is_running() or \
                    psutil.Process(st["pid"]).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    st = read_status(out)
    if st.get("state") in ("starting", "running"):
        print(f"{out}: still running after {timeout:.0f}s (a step can be long); the STOP file stays, "
              "check again with `python memory_optimizer.py status`", file=sys.stderr)
        return 1
    print(f"{out}: {st.get('state')} at step {st.get('step')}; checkpoint {st.get('last_checkpoint')}")
    return 0


def monitor_run(run, root="runs", interval=5.0, once=False):
    """Reprint one run's status every `interval` s until it ends (or Ctrl-C)."""
    out, _ = pick_run(root, run)
    try:
        while True:
            st = read_status(out)
            state = shown_state(st, out)
            v = lambda key, fmt="{}": "-" if st.get(key) is None else fmt.format(st[key])  # noqa: E731 (not yet: -)
            print(f"[{datetime.datetime.now():%H:%M:%S}] {out.name}: {state} | step {v('step')}/{v('total_steps')}"
                  + (f" | epoch {v('epoch')}" if "epoch" in st else "") + f" | loss {v('loss', '{:.4f}')} | "
                  f"{st.get('metric_name', 'metric')} {v('metric', '{:.4g}')} | {v('samples_per_s', '{:,.0f}')} "
                  f"samples/s | ETA {fmt_eta(st.get('eta_s'))} | RAM {v('ram_mb', '{:,.0f}')} MB"
                  + (f" | GPU {st['gpu_mb']:,.0f} MB" if st.get("gpu_mb") is not None else ""), flush=True)
            if once or state not in ("starting", "running"):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def cmd_start(args, flags):
    start_background(args.trainer, flags, args.runs, args.nproc)
    return 0


def cmd_plan(args, flags):
    """The trainer's own memory plan (weights, gradients, optimizer state, activations measured by
    one forward), for these flags, without training: it runs the trainer with --plan in a
    temporary run folder, so no run folder of yours is touched."""
    if args.trainer not in TRAINERS:
        raise UserError(f"plan {args.trainer}: no such trainer; pick one of {', '.join(TRAINERS)}")
    if any(f == "--out" or f.startswith("--out=") for f in flags):
        print("plan: --out ignored (the plan runs in a temporary folder)")
    with tempfile.TemporaryDirectory(prefix="plan-") as tmp:
        cmd = [sys.executable, str(REPO / TRAINERS[args.trainer]), *flags, "--plan", "--out", str(Path(tmp) / "run")]
        return subprocess.run(cmd).returncode


def cmd_status(args):
    runs = list_runs(args.runs)
    print(status_table(runs) if runs else f"no runs under {args.runs}/")
    return 0


def cmd_stop(args):
    return stop_run(args.run, args.runs, args.timeout)


# -----------------------------------------------------------------------------

def seconds(s):
    """argparse type: a positive number of seconds (its name appears in argparse's message)."""
    return pos_float(s)


def build_parser():
    p = Parser(prog="memory_optimizer.py", description=__doc__, formatter_class=HelpFormat)
    sub = p.add_subparsers(dest="cmd", required=True,
                           metavar="{profile,config,optimize,plan,monitor,start,status,stop}")

    s = sub.add_parser("profile", formatter_class=HelpFormat, help="CPU, RAM, GPU, disk and versions of this machine")
    s.add_argument("--json", action="store_true", help="print the profile as a JSON dict instead of a table")

    s = sub.add_parser("config", formatter_class=HelpFormat,
                       help="write optimal_config.json: recommended settings for every trainer")
    s.add_argument("--out", default="optimal_config.json", metavar="PATH",
                   help="file to write (default optimal_config.json here, where the trainers look for it)")
    s.add_argument("--quick", action="store_true",
                   help="recommend batch sizes for --quick runs (the quick column of the RAM table)")

    s = sub.add_parser("optimize", formatter_class=HelpFormat,
                       help="free this process's caches, show RAM/GPU use and the biggest "
                                        "processes, recommend what to close (never kills anything)")
    s.add_argument("--top", type=pos_int, default=8, metavar="N",
                   help="list the N processes using the most RAM")

    s = sub.add_parser("plan", formatter_class=HelpFormat, allow_abbrev=False,
                       help="a trainer's memory plan for its flags, without training: plan asr --preset minimal",
                       description="plan TRAINER [its flags]: weights, gradients, optimizer state and the activations "
                                   "of one measured forward, as the trainer prints before its first step")
    s.add_argument("trainer", help=", ".join(TRAINERS) + "; every flag after it goes to the trainer")

    s = sub.add_parser("monitor", formatter_class=HelpFormat,
                       help="print RAM, CPU, GPU and running trainings every few seconds; with RUN or "
                            "--latest, one run's status until it ends")
    s.add_argument("run", nargs="?", metavar="RUN", help="follow this run folder (or name under --runs) instead")
    s.add_argument("--latest", action="store_true",
                   help="follow the newest run when no RUN is given (what `./run.sh monitor` does)")
    s.add_argument("--duration", type=seconds, default=None, metavar="S",
                   help="machine monitor: stop after S seconds (default 60; Ctrl-C stops earlier)")
    s.add_argument("--interval", type=seconds, default=None, metavar="S",
                   help="seconds between rows (default 2; following a run, 5)")
    s.add_argument("--csv", default=None, metavar="PATH",
                   help="machine monitor: also append every row to this CSV file (header written once)")
    s.add_argument("--runs", default="runs", metavar="DIR", help="folder holding the run folders")

    s = sub.add_parser("start", formatter_class=HelpFormat, allow_abbrev=False,
                       help="start a trainer detached: start gru [trainer flags]",
                       description="start TRAINER [its flags, e.g. --quick --out runs/q]")
    s.add_argument("trainer", help=", ".join(TRAINERS) + "; every flag after it goes to the trainer")
    s.add_argument("--runs", default="runs", metavar="DIR",
                   help="folder for the run folder when the trainer flags give no --out")
    s.add_argument("--nproc", type=pos_int, default=1, metavar="N",
                   help="processes on this machine, e.g. one per GPU: N > 1 runs the trainer under torchrun "
                        "(--batch-size is then per process); README 'Several GPUs or machines'")
    s = sub.add_parser("status", formatter_class=HelpFormat, help="table of runs from their status.json")
    s.add_argument("--runs", default="runs", metavar="DIR", help="folder holding the run folders")
    s = sub.add_parser("stop", formatter_class=HelpFormat, help="stop a run gracefully (it saves a checkpoint first)")
    s.add_argument("run", nargs="?", metavar="RUN", help="run folder or name under --runs (default: newest running)")
    s.add_argument("--timeout", type=pos_float, default=120.0, metavar="S",
                   help="seconds to wait for the trainer to save and exit")
    s.add_argument("--runs", default="runs", metavar="DIR", help="folder holding the run folders")
    return p


def main(argv=None):
    p = build_parser()
    # `start` hands every flag it does not know to the trainer; the other commands take none
    args, rest = p.parse_known_args(argv)
    if args.cmd == "start":
        return cmd_start(args, rest)
    if args.cmd == "plan":
        return cmd_plan(args, rest)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"profile": cmd_profile, "config": cmd_config, "optimize": cmd_optimize,
            "monitor": cmd_monitor, "status": cmd_status, "stop": cmd_stop}[args.cmd](args)


if __name__ == "__main__":
    run_main(main)
