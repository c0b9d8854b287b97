"""common.py -- the small core every lean-train trainer shares.

Plain functions with explicit arguments: no Trainer class, no callbacks, no hidden globals.
A trainer keeps its own loop (epochs, eval, log and save cadence) and calls in here for what
is easy to get wrong:

    flags ............ make_parser, resolve_settings (defaults < optimal_config.json < flags)
    device/precision . setup_device, measure_precision
    the step ......... train_step (autocast, exact accumulation, unscale, clip, step, OOM retry)
    fit the machine .. fit_batch (RAM/GPU table, a real forward+backward probe); memory_plan (memory_plan.py)
    memory ........... memory_snapshot, peak_memory_mb, free_memory, check_memory
    checkpoints ...... training_state, save_checkpoint (atomic, checksum, rotation), find_checkpoint
    run folder ....... open_run, start_run, update_status, log_step, append_metrics, write_json_atomic
    stopping ......... install_stop_handlers, stop_requested (SIGTERM/SIGINT/CTRL_BREAK/STOP file)

Capability that only some runs use has a module of its own, imported only under its flag (download, records,
adamw8bit, precision_probe, ddp: README's Layout says which; memory_optimizer.py reads the optimal_config.json it
writes); memory_plan.py is read where present. A trainer copied with common.py alone runs without them (opt_in).
"""
import argparse
import contextlib
import copy
import ctypes
import datetime
import errno
import gc
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np
import psutil
import torch

TRAINERS = {"gru": "train_gru.py", "classifier": "train_classifier.py",
            "asr": "train_asr.py", "lm": "train_lm.py", "sft": "train_sft.py"}
CKPT_GLOB = "ckpt_step*.pt"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> autocast dtype
RECORD_EXTS = (".csv", ".tsv", ".jsonl", ".json")  # records.py's readers; .json: JSON lines (NeMo's manifests)


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file). Printed as one line, exit code 2."""


def opt_in(module, why):
    """Import an opt-in module (download, records, adamw8bit, memory_plan, ddp) when its flag is on.
    A trainer copied alone with common.py runs without them; asked for one, it says which file."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise UserError(f"{why} needs {module}.py beside {Path(sys.argv[0]).name}; copy it from lean-train") from None


def run_main(main):
    """User mistakes (UserError) exit 2 with one line."""
    from tqdm import tqdm  # tqdm.write clears a progress bar first: the line starts on its own
    try:
        code = main()
    except UserError as e:
        tqdm.write(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:  # a second Ctrl-C in training (install_stop_handlers), or Ctrl-C outside it
        tqdm.write("stopped at once by Ctrl-C (a training run resumes from its last checkpoint when re-run)",
                   file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `... status | head`: the reader left; nothing to report
        sys.stderr.close()
        sys.exit(0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun rank skips the interpreter's teardown, where gloo's worker thread aborted it
        # ("terminate called without an active exception", 7 in 30 runs); every file is closed
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


# -----------------------------------------------------------------------------
# flags

class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring's layout, and every flag's default in --help (unless its help speaks of it or it is None)."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""
    def error(self, message):  # one line, exit 2 (argparse would also print the whole usage)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description, trainer, *, epochs, lr, effective_batch, save_every=50, eval_every=0,
                log_every=10, keep=3, epochs_help="passes over the training data"):
    """Every trainer's parser starts here, so the same flag means the same thing everywhere.

    Trainer-specific defaults come in as arguments; trainers add their own flags afterwards."""
    p = Parser(description=description, allow_abbrev=False, formatter_class=HelpFormat)
    p.set_defaults(trainer=trainer, effective_batch=effective_batch,
                   # settings without a flag of their own: optimal_config.json and
                   # --resource-efficient set them, args.json records them
                   workers=0, pin_memory=False)
    g = p.add_argument_group("run folder and resume (the same on every trainer)")
    g.add_argument("--out", "--checkpoint_dir", dest="out", default=None,
                   help=f"run folder (default: the newest unfinished run of this command under runs/, else a new "
                        f"runs/{trainer}-<timestamp>); re-run the same command to resume")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="resume from this checkpoint file instead of the newest in --out; bare --resume: the "
                        "newest in --out, as a plain re-run does")
    g.add_argument("--no-resume", action="store_true",
                   help="start from scratch; old checkpoints are moved aside, not deleted")
    g.add_argument("--save-every", type=pos_int, default=save_every, metavar="N",
                   help="checkpoint every N optimizer steps (also at epoch end and on stop)")
    g.add_argument("--keep", type=pos_int, default=keep, metavar="K",
                   help="keep the last K step checkpoints, plus best.pt")
    g.add_argument("--config", default="optimal_config.json", metavar="PATH",
                   help="settings written by `memory_optimizer.py config`; read when present, "
                        "flags override it")
    g = p.add_argument_group("training (the same on every trainer)")
    g.add_argument("--quick", action="store_true", help="small, fast run to check the setup")
    g.add_argument("--epochs", type=pos_int, default=epochs, help=epochs_help)
    g.add_argument("--max-steps", type=pos_int, default=None, metavar="N",
                   help="stop after N optimizer steps in total (overrides --epochs)")
    g.add_argument("--seed", type=nonneg_int, default=1337, help="random seed; fixed seed on CPU = same numbers")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=batch_size_arg, default="auto",
                   metavar="N|auto",
                   help="micro-batch size; auto = RAM/GPU table, proved by a forward+backward probe")
    g.add_argument("--grad-accum", "--gradient_accumulation_steps", dest="grad_accum",
                   type=batch_size_arg, default="auto", metavar="K|auto",
                   help=f"micro-batches per optimizer step; auto keeps the effective batch "
                        f"at {effective_batch}")
    g.add_argument("--lr", type=pos_float, default=lr,
                   help="peak learning rate (AdamW)" + ("; default depends on the model" if lr is None else ""))
    g.add_argument("--clip", type=nonneg_float, default=1.0,
                   help="gradient-norm clipping, 0 = off (train_classifier.py's LoRA on --pretrained: 0 unless typed)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto = bf16 on CUDA where native, else fp16 + GradScaler; on a CPU fp32, or bf16 where "
                        "this model's step measures 1.2x faster (not timed under --quick)")
    g.add_argument("--mixed_precision", dest="precision", action="store_const", const="auto",
                   help="the seeds' spelling of --precision auto")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    g.add_argument("--eval-every", type=nonneg_int, default=eval_every, metavar="N",
                   help="evaluate every N optimizer steps (0 = at epoch end only)")
    g.add_argument("--log-every", type=pos_int, default=log_every, metavar="N",
                   help="log line + metrics.jsonl record every N optimizer steps")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the log lines' figures and every evaluation to TensorBoard in <out>/tb "
                        "(needs `pip install tensorboard`)")
    g.add_argument("--eval-only", action="store_true",
                   help="train nothing: evaluate the run's best model (or --resume CKPT) on its validation and "
                        "test data, print the figures a training run reports and write them to <out>/eval.json")
    g = p.add_argument_group("data files and downloads (the same on every trainer)")
    g.add_argument("--bad-rows", choices=["skip", "fail"], default="skip",
                   help="a data row that is malformed or lacks a column: skip it (counted, the first few "
                        "named with their line numbers) or stop at it")
    g.add_argument("--sha256", action="append", default=None, metavar="HEX",
                   help="expected SHA-256 of each data source, in the order of the data flags (repeat it; "
                        "sources after the last one are not checked)")
    g.add_argument("--max-download-mb", type=pos_float, default=200.0, metavar="MB",
                   help="refuse a downloaded file larger than this (MB = 2**20 bytes)")
    g.add_argument("--download-dir", default=str(Path("data") / "downloads"), metavar="DIR",
                   help="where data given as an http(s) URL is kept (a finished file is reused, a partial "
                        "one resumed)")
    g = p.add_argument_group("memory (the same on every trainer)")
    g.add_argument("--resource-efficient", action="store_true",
                   help="small-machine preset: lower memory thresholds, smaller micro-batch with more "
                        "accumulation, more frequent checkpoints/evals, gradient checkpointing")
    g.add_argument("--ram-threshold", type=percent, default=85.0, metavar="PCT",
                   help="free caches when system RAM use passes this percentage")
    g.add_argument("--gpu-threshold", type=percent, default=90.0, metavar="PCT",
                   help="free caches when GPU memory use passes this percentage")
    g.add_argument("--swap-threshold", type=percent, default=50.0, metavar="PCT",
                   help="free caches when swap use passes this percentage (swapping slows training 10-100x)")
    g.add_argument("--mem-check-every", type=pos_float, default=30.0, metavar="S",
                   help="seconds between memory checks")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (where the model supports it)")
    g.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps AdamW's two moments in 8 bits, per block of 2,048 values: about "
                        "2 bytes of optimizer state per weight instead of 8 (tensors under 4,096 values stay fp32)")
    g.add_argument("--gpu-memory", type=pos_float, default=None, metavar="GB",
                   help="CUDA: cap this process at GB of GPU memory (a 24 GB card behaves like a 4 GB one); the "
                        "batch probe, the memory plan and out-of-memory recovery all work under the cap")
    g.add_argument("--max-memory", type=pos_float, default=None, metavar="GB",
                   help="CPU: the most RAM this process may reach; the batch probe halves the micro-batch "
                        "until a step fits under it (accumulation keeps the effective batch)")
    g.add_argument("--measure-peak", action="store_true",
                   help="CPU: measure the peak of live tensors in the largest steps with torch's profiler (slows them "
                        "~2x) for summary.json's peak_tensor_mb, beside the plan (on CUDA: always, for free)")
    g.add_argument("--plan", action="store_true",
                   help="print the memory plan (weights, gradients, optimizer state, activations) and stop "
                        "before the first step; `memory_optimizer.py plan TRAINER ...` runs this in a temporary folder")
    return p


def checked(conv, ok, what):
    """An argparse type: conv(s) where ok(value), else one line "must be <what>, got ..." (not "invalid pos_int")."""
    def parse(s):
        try:
            v = conv(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v
    return parse


pos_int = checked(int, lambda v: v >= 1, "a positive integer")
nonneg_int = checked(int, lambda v: v >= 0, "an integer, 0 or more")
pos_float = checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonneg_float = checked(float, lambda v: v >= 0 and math.isfinite(v), "0 or a positive number")
percent = checked(float, lambda v: 0 < v <= 100, "a percentage in (0, 100]")


batch_size_arg = lambda s: "auto" if str(s) == "auto" else pos_int(s)  # noqa: E731  ('auto' or a positive integer)


class Typed(argparse.Namespace):
    """A namespace that ignores argparse.SUPPRESS: parsed into with every default suppressed, it
    ends up holding only what the command line itself set."""

    def __setattr__(self, name, value):
        if value is not argparse.SUPPRESS:
            super().__setattr__(name, value)


def flag_reader(parser):
    """A copy of `parser` that reads only what a command line sets: every default is
    argparse.SUPPRESS, and a bad value raises argparse.ArgumentError instead of exiting."""
    reader = copy.deepcopy(parser)  # set_defaults changes the parser it is called on
    reader.set_defaults(**dict.fromkeys(vars(parser.parse_known_args([])[0]), argparse.SUPPRESS))
    reader.exit_on_error = False
    return reader


def explicit_flags(parser, argv):
    """The dests typed on the command line (an alias counts as its dest): config and presets never override them."""
    return set(vars(flag_reader(parser).parse_known_args(argv, namespace=Typed())[0]))


def resolve_settings(parser, argv, log=print, modes=None, own_changes=()):
    """Parse argv, then layer optimal_config.json and --resource-efficient (or `modes`, train_sft.py's
    table; own_changes: rows the trainer adds to its before -> after table) under the flags. Returns
    (args, sources): sources[name] is "default", "flag", "optimal_config.json", "resource-efficient",
    later "auto" or "checkpoint"."""
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    sources = {k: ("flag" if k in given else "default") for k in vars(args)}

    cfg_path, applied = Path(args.config), []
    if cfg_path.exists():  # memory_optimizer.py writes it and reads it: one place knows its layout
        applied = opt_in("memory_optimizer", f"{cfg_path} (read where it is; move it away to run without it)"
                         ).apply_config(args, sources, flag_reader(parser), cfg_path)
    elif "config" in given:
        try:  # the seeds' `--config small_32k` names a preset: here that is --preset
            preset = "preset" in vars(args) and "preset" in vars(
                flag_reader(parser).parse_known_args(["--preset", args.config], namespace=Typed())[0])
        except argparse.ArgumentError:
            preset = False
        raise UserError(f"--config {cfg_path}: no such file; {args.config} is a preset here: use --preset "
                        f"{args.config}" if preset else f"--config {cfg_path}: file not found; create it with "
                        f"`python memory_optimizer.py config --out {cfg_path}` or drop the flag")

    if modes is not None:
        modes(args, sources, log)
    elif args.resource_efficient:
        apply_resource_efficient(args, sources, log, own_changes)
    if taken := [f"{k}={getattr(args, k)}" for k in applied if sources[k] == "optimal_config.json"]:  # not overruled
        log(f"settings from {cfg_path}: {', '.join(taken)} (flags override these)")
    if args.plan or args.measure_peak:  # the file they need, before anything is built
        opt_in("memory_plan", "--plan or --measure-peak")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                        "metrics.jsonl has the same numbers")
    if args.resource_efficient and keep_heap_small():
        log("--resource-efficient: tensors of 1 MB and more go back to the OS when freed "
            "(glibc mmap threshold fixed at 1 MB)")
    return args, sources


def resource_efficient_eval(args, sources, steps_per_epoch, log=print):
    """--resource-efficient evaluates twice as often: with evaluation at epoch end only
    (--eval-every 0), that means every half epoch."""
    if args.resource_efficient and args.eval_every == 0 and sources.get("eval_every") != "flag":
        args.eval_every, sources["eval_every"] = max(1, steps_per_epoch // 2), "resource-efficient"
        log(f"--resource-efficient: evaluating every {args.eval_every} steps (half an epoch)")


def apply_resource_efficient(args, sources, log=print, own_changes=()):
    """The --resource-efficient preset, applied before anything is built; flags typed by the
    user win. The batch halving happens in choose_batch_size (it needs the chosen batch)."""
    wanted = [("ram_threshold", 70.0), ("gpu_threshold", 75.0), ("swap_threshold", 30.0), ("mem_check_every", 15.0),
              ("workers", min(args.workers, 1)), ("pin_memory", False),  # never more loader processes
              ("save_every", max(1, args.save_every // 2)),
              ("eval_every", max(1, args.eval_every // 2) if args.eval_every else 0),
              ("grad_checkpointing", True)]
    rows = []
    for key, value in wanted:
        before = getattr(args, key)
        if sources.get(key) == "flag":
            rows.append((key, before, before, "kept: given as a flag"))
        elif before != value:
            setattr(args, key, value)
            sources[key] = "resource-efficient"
            rows.append((key, before, value, ""))
    rows.append(("micro-batch", "chosen", "halved", "grad accumulation doubled, same effective batch"))
    # what the trainer's own file does under the flag; a row named after a flag the user typed is kept
    rows += [(r[0], r[1], r[1], "kept: given as a flag") if sources.get(r[0]) == "flag" else r for r in own_changes]
    log("--resource-efficient changes:")
    for key, before, after, note in rows:
        log(f"  {key:<20} {str(before):>8} -> {str(after):<8} {note}".rstrip())


# -----------------------------------------------------------------------------
# data flags given as http(s) URLs (download.py)

def is_url(s):
    return urllib.parse.urlsplit(str(s)).scheme.lower() in ("http", "https")


def file_sha256(path):
    """Hex SHA-256 of a file, read 1 MB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_data(args, flags, log=print, exts=None):
    """The data flags named in `flags` (dests), with every http(s) URL downloaded into
    --download-dir and replaced by the local path, and --sha256 checked: download.py, imported
    only when a flag is a URL or --sha256 is given. A plain run of local files never loads it."""
    values = [v for dest in flags for v in (getattr(args, dest) if isinstance(getattr(args, dest), list)
                                            else [getattr(args, dest)]) if v]
    if args.sha256 or any(is_url(v) for v in values):
        opt_in("download", "a data flag given as a URL, or --sha256,").fetch_data(args, flags, log, exts)


# -----------------------------------------------------------------------------
# device and precision

def setup_device(args, sources=None):
    """(device, amp_dtype or None, scaler, why). --precision auto: bf16 on CUDA where native, else
    fp16 + GradScaler; fp32 on a CPU until measure_precision has timed bf16. A config's precision
    that does not fit the device falls back to auto."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu "
                        "(or install a CUDA build of torch)")
    # with its index: set_per_process_memory_fraction needs one (under torchrun, ddp.Ranks has set this rank's)
    dev = (torch.device("cuda", torch.cuda.current_device()) if args.device in ("auto", "cuda")
           and torch.cuda.is_available() else torch.device("cpu"))
    prec, src = args.precision, (sources or {}).get("precision", "flag")
    if src == "optimal_config.json" and (dev.type == "cpu") != (prec == "fp32"):
        args.precision = prec = "auto"  # e.g. a GPU machine's config with --device cpu: decided (and timed) as auto
    why = f"{prec} from {src}"
    if dev.type == "cpu":
        if prec == "fp16":
            raise UserError("--precision fp16 needs CUDA (no fp16 GradScaler on CPU); use bf16 or fp32")
        if prec == "auto":
            prec, why = "fp32", "fp32; bf16 only where this model's step is timed faster in it"
        why = "CPU: " + why + ("; --gpu-memory has no effect on a CPU (--max-memory caps RAM)"
                               if getattr(args, "gpu_memory", None) else "")
    else:
        check_gpu_arch(dev)
        bf16_ok = native_bf16(dev)
        if prec == "bf16" and not bf16_ok:
            raise UserError("--precision bf16: this GPU does not support bf16; use fp16 or auto")
        if prec == "auto":
            prec = "bf16" if bf16_ok else "fp16"
            why = "GPU supports bf16" if bf16_ok else "GPU lacks bf16: fp16 with GradScaler"
        if bf16_ok:  # Ampere+, as TF32
            torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fp32 matmuls via TF32 cores
            torch.backends.cudnn.allow_tf32 = True
            why += "; TF32 on (Ampere+)"
        if getattr(args, "gpu_memory", None):
            # the caching allocator raises its out-of-memory error at the cap, as a small card would:
            # the probe, the plan and train_step's halving see exactly what they would see there
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory * 2**30 / total), dev)
            why += f"; capped at {args.gpu_memory:g} of {total / 2**30:.0f} GB (--gpu-memory)"
    if sources is not None:
        sources.update({k: "auto" for k in ("precision", "device") if getattr(args, k) == "auto"})
    args.device, args.precision = dev.type, prec
    # bf16 has fp32's exponent range, so only fp16 needs loss scaling
    return dev, DTYPES[prec], torch.amp.GradScaler(dev.type, enabled=(prec == "fp16")), why


def check_gpu_arch(device):
    """A GPU older than every architecture this torch build has kernels for (a P100 or V100 with
    the CUDA 13 wheels) fails at its first kernel with "no kernel image is available": say so
    before, in one line. A newer GPU runs an older sm_ of its own major, or JIT-compiles PTX."""
    built = sorted(int(m[1]) for m in re.finditer(r"sm_(\d+)", " ".join(torch.cuda.get_arch_list())))
    major, minor = torch.cuda.get_device_capability(device)
    if built and 10 * major + minor < built[0]:
        raise UserError(f"this GPU ({torch.cuda.get_device_name(device)}, sm_{major}{minor}) is older than every "
                        f"architecture this torch build was compiled for (sm_{built[0]} and up): install a torch "
                        "build that still supports it (an older CUDA wheel), or use --device cpu")


def native_bf16(device):
    """bf16 in hardware: compute capability 8.0+ (Ampere). Not torch.cuda.is_bf16_supported():
    before torch 2.5 it also says yes where bf16 is only emulated (a T4: slower than fp16, and
    cuDNN has no bf16 convolutions there), and `including_emulation=False` does not exist yet."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_bf16():
    """True when /proc/cpuinfo lists bf16 matrix or vector units (AMX or AVX-512 BF16); False
    where it cannot tell (no /proc: macOS, Windows), which keeps such machines on fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def measure_precision(args, sources, device, model, step, resumed=None, margin=1.2):
    """--precision auto on a CPU: bf16 where the CPU has bf16 units and precision_probe.py times this model's step
    (step(amp_dtype), at the run's micro-batch) `margin` faster in it, else fp32. Returns (amp_dtype, why or None);
    sets args.precision."""
    if device.type != "cpu" or sources.get("precision") != "auto":
        return DTYPES[args.precision], None  # typed, from a config, or CUDA's rule: nothing to measure
    if resumed:
        args.precision, sources["precision"] = resumed, "checkpoint"
        return DTYPES[resumed], f"CPU: {resumed} from the checkpoint being resumed"
    if args.quick:  # a smoke run of a tiny model: nothing to gain, and its numbers stay the same everywhere
        return None, "CPU: fp32 (--quick runs are not timed)"
    if not cpu_has_bf16():
        return None, "CPU: fp32 (no bf16 units listed in /proc/cpuinfo)"
    try:
        probe = importlib.import_module("precision_probe")
    except ModuleNotFoundError:
        return None, "CPU: fp32 (precision_probe.py, which times bf16 here, is not beside the trainer)"
    with side_effect_free(model, device):
        args.precision, why = probe.choose(step, margin)
    return DTYPES[args.precision], why


@contextlib.contextmanager
def side_effect_free(model, device):
    """Around a probe or a timing: the RNG streams (the CPU's, this GPU's) and the model's buffers
    (e.g. BatchNorm statistics) are as before the block, so the run's numbers do not change."""
    saved = [t.clone() for t in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    with torch.no_grad():
        for t, before in zip(model.buffers(), saved):
            t.copy_(before)


def autocast(device, amp_dtype):
    """torch.amp.autocast for amp_dtype; a no-op for fp32 (amp_dtype None)."""
    return torch.amp.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# -----------------------------------------------------------------------------
# the step: autocast + exact gradient accumulation + unscale + clip + step, with OOM retry

def is_oom(e):
    """True for CUDA out-of-memory and MemoryError, the errors a smaller batch can fix; cuBLAS and
    cuDNN report a failed allocation of their workspace in their own words."""
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and re.search(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED",
                                                  str(e)) is not None)


def train_step(model, optimizer, scaler, batch, loss_fn, micro_bs, *, clip, device, amp_dtype, log=print,
               no_sync=None, norm=None):
    """One optimizer step over `batch` (the whole effective batch), in micro-batches of micro_bs.

    loss_fn(model, micro_batch) -> (loss_sum, n_items), summed over the items it counts (tokens,
    frames, samples). Accumulation is exact: each micro-batch back-propagates loss_sum / estimate,
    then the gradient is rescaled by estimate / true total, so it is that of sum(loss)/sum(n) over
    the whole batch (a padded micro-batch must not weigh like a full one). An out-of-memory error
    in forward or backward halves the micro-batch and redoes the step; one in the optimizer step
    (no micro-batch makes its state smaller) or under DDP (one rank cannot redo a collective step
    alone) is one error line saying what to change. DDP: all but the last micro-batch run inside
    no_sync; norm = n_global / world makes DDP's average of the ranks' gradients the 1-process
    gradient. Returns (mean loss, items, the micro_bs used)."""
    n_items = len(next(iter(batch.values())))
    while True:
        oom = unscaled = stepping = False
        try:
            # the batch (a dict of tensors, dim 0 = samples) in micro-batches of micro_bs samples
            micro = [{k: v[i:i + micro_bs] for k, v in batch.items()} for i in range(0, n_items, micro_bs)]
            total_loss, total_n, estimate = 0.0, 0, None
            for i, mb in enumerate(micro):
                sync = no_sync() if no_sync is not None and i < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    with autocast(device, amp_dtype):
                        loss_sum, n = loss_fn(model, mb)
                    n = int(n)
                    if estimate is None:  # with norm known up front, no correction is needed after
                        estimate = norm or max(1, n * len(micro))
                    scaler.scale(loss_sum.float() / estimate).backward()
                total_loss += loss_sum.item()
                total_n += n
                del loss_sum  # else the graph of the last micro-batch lives through the optimizer step
            unscaled = True
            scaler.unscale_(optimizer)  # clip must see true gradients, not fp16-scaled ones
            correction = estimate / (norm or max(1, total_n))
            if correction != 1.0:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(correction)
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            stepping = True
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return total_loss / max(1, total_n), total_n, micro_bs
        except Exception as e:
            if not is_oom(e):
                raise
            if stepping:  # AdamW may have updated some moments already: the step cannot be redone
                raise UserError("out of memory in the optimizer step, after backward: its state and temporaries "
                                "do not shrink with the micro-batch; use --optim adamw8bit, a smaller model or a "
                                "larger --gpu-memory (re-running resumes from the last checkpoint)") from None
            if no_sync is not None and micro_bs > 1:
                raise UserError(f"out of memory at micro-batch {micro_bs} under torchrun, where one rank cannot "
                                f"redo its step alone: re-run with --batch-size {micro_bs // 2} --grad-accum "
                                f"{2 * math.ceil(n_items / micro_bs)} (it resumes "
                                "from the last checkpoint)") from None
            if micro_bs == 1:
                raise
            oom = True  # free below: inside `except` the traceback still pins the step's tensors
        if oom:
            loss_sum = None  # the failed try's graph, when backward raised before `del loss_sum`
            optimizer.zero_grad(set_to_none=True)  # partial gradients of the failed try
            free_memory(device)
            if unscaled:
                # forget the failed try's unscale_, else the retry's unscale_ raises "already been
                # called": update(new_scale) clears that per-optimizer record, as every update()
                # does, while keeping the scale and its growth count (no inf check consumed)
                scaler.update(new_scale=scaler.get_scale())
            micro_bs = max(1, micro_bs // 2)
            log(f"out of memory: micro-batch halved to {micro_bs} (more accumulation, "
                "same effective batch); redoing the step")


def evaluate_halving(evaluate, bs, device, log=print):
    """(evaluate(bs), the bs that fitted): the batch halved after an out-of-memory error. Every
    evaluation sums over items, so the batch size changes no figure (up to float rounding)."""
    while True:
        try:
            return evaluate(bs), bs
        except Exception as e:
            if not is_oom(e) or bs == 1:
                raise
        free_memory(device)  # outside `except`: there the traceback still pins the failed batch
        bs = max(1, bs // 2)
        log(f"out of memory in evaluation: its batch halved to {bs}; evaluating again")


# -----------------------------------------------------------------------------
# optimizer: AdamW, or AdamW with 8-bit moments (--optim adamw8bit: adamw8bit.py)

def fused_adamw(device):
    """AdamW's one-pass kernel: on CUDA, and on a CPU since torch 2.4. On a CPU it took the
    optimizer step of train_lm.py's 6 x 384 GPT from 24 to 8 ms, the ASR's from 19.9 to 6.8 ms."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


def make_optimizer(params, args, *, lr, betas=(0.9, 0.999), weight_decay=0.0, fused=None):
    """torch.optim.AdamW, or adamw8bit.AdamW8bit under --optim adamw8bit (it has no fused kernel)."""
    if args.optim == "adamw8bit":
        return opt_in("adamw8bit", "--optim adamw8bit").AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


# -----------------------------------------------------------------------------
# fitting the machine: the micro-batch, the precision, the memory plan

def table_batch_size(device, quick, free_gpu_gb=None, ram_gb=None):
    """The micro-batch to start the probe from: the seeds' RAM table on a CPU, free memory on
    CUDA. Returns (batch size, reason)."""
    if device == "cuda":
        gb = free_gpu_gb if free_gpu_gb is not None else torch.cuda.mem_get_info()[0] / 2**30
        bs = 64 if gb >= 16 else 32 if gb >= 8 else 16 if gb >= 4 else 8
        return (bs if quick else bs // 2), f"{gb:.1f} GB free on the GPU"
    gb = ram_gb if ram_gb is not None else psutil.virtual_memory().total / 2**30
    bs = (4 if gb < 8 else 8 if gb <= 16 else 16) // (1 if quick else 2)
    return bs, f"{gb:.0f} GB RAM ({'quick' if quick else 'standard'} column of the RAM table)"


def choose_batch_size(args, sources, device, probe, log=print, resumed=None):
    """--batch-size/--grad-accum as (micro_bs, accum, why). probe(bs): one forward+backward at bs, the bytes it
    needed (or an out-of-memory error). `resumed` = a checkpoint's (micro, accum), kept unless the flags are
    typed: the same product goes on as before (the seeds' remedy after an out-of-memory error: resume with
    --batch-size 1 --grad-accum 8); another is a new effective batch (the trainer calls rebatch)."""
    E = args.effective_batch
    if resumed:
        micro, accum = resumed
        typed = [sources[k] == "flag" and getattr(args, k) != "auto" for k in ("batch_size", "grad_accum")]
        if any(typed):
            want_micro = args.batch_size if typed[0] else max(1, micro * accum // args.grad_accum)
            want_accum = args.grad_accum if typed[1] else max(1, micro * accum // want_micro)
            named = " and ".join(f for f, t in zip(("--batch-size", "--grad-accum"), typed) if t)
            keep = micro * accum // want_micro if typed[0] and micro * accum % want_micro == 0 else None
            why = f"{want_micro} x {want_accum} ({named} typed), for the checkpoint's {micro} x {accum}: " + (
                "the same effective batch, so the run goes on as before (accumulation is exact, up to float "
                "rounding)" if want_micro * want_accum == micro * accum else f"a new effective batch (was "
                f"{micro * accum}): the run goes on, no longer bit-identical to an uninterrupted one" + (
                    f" (--batch-size {want_micro} --grad-accum {keep} would keep it)" if keep else ""))
            micro, accum = want_micro, want_accum
        else:
            why = "from the checkpoint being resumed"
        sources["batch_size"] = sources["grad_accum"] = "checkpoint"
    elif args.batch_size == "auto":
        start, why = table_batch_size(device.type, args.quick, free_gpu_gb=free_gpu_gb(device, args.gpu_memory))
        start = min(start, E)  # a micro-batch never exceeds the effective batch
        micro = probe_batch_size(probe, start, device, args, log)
        accum = (args.grad_accum * start // micro if args.grad_accum != "auto"
                 else max(1, math.ceil(E / micro)))
        why = f"start {start} from {why}; probe {'kept it' if micro == start else f'halved to {micro}'}"
        sources["batch_size"] = "auto"
    else:
        micro = args.batch_size
        accum = args.grad_accum if args.grad_accum != "auto" else max(1, math.ceil(E / micro))
        why = f"--batch-size from {sources['batch_size']}"
    if not resumed and args.grad_accum == "auto":
        sources["grad_accum"] = "auto"
    # a batch the user typed, or one a mode set outright (train_lm.py's table), is not halved
    if not resumed and args.resource_efficient and micro > 1 and sources["batch_size"] not in ("flag",
                                                                                             "resource-efficient"):
        micro, accum = micro // 2, accum * 2
        why += "; halved by --resource-efficient"
    args.batch_size, args.grad_accum = micro, accum
    return micro, accum, why


def probe_batch_size(probe, start, device, args, log=print):
    """Halve `start` until one forward+backward fits under the memory thresholds and caps."""
    bs = start
    while True:
        try:
            need = probe(bs)
            over = "the memory threshold"
            if device.type == "cuda":
                # `need` is what the step adds: take off what others hold on the card (the CUDA
                # context, other programs) and what this run holds already (its weights)
                free, total = torch.cuda.mem_get_info(device)
                others = max(0, total - free - torch.cuda.memory_reserved(device))
                held = torch.cuda.memory_allocated(device)
                limit = total * args.gpu_threshold / 100 - others - held
                capped = (args.gpu_memory or math.inf) * 2**30 * args.gpu_threshold / 100 - held
                if capped < limit:
                    limit, over = capped, f"--gpu-memory {args.gpu_memory:g}"
                over += f" ({held / 2**20:.0f} MB held by this run, {others / 2**20:.0f} MB by others)"
            else:
                vm = psutil.virtual_memory()
                # what is already used by others + what this step needs must stay under the threshold
                limit = vm.total * args.ram_threshold / 100 - (vm.total - vm.available)
                rss = psutil.Process().memory_info().rss
                if args.max_memory and args.max_memory * 2**30 - rss < limit:  # this process + the step
                    limit = args.max_memory * 2**30 - rss
                    over = f"--max-memory {args.max_memory:g} (this process holds {rss / 2**30:.2f} GB before it)"
            if need <= limit or bs == 1:
                return bs
            log(f"batch probe: {bs} needs {need / 2**20:.0f} MB, over {over}; halving")
        except Exception as e:
            if not is_oom(e) or bs == 1:
                raise
            log(f"batch probe: {bs} ran out of memory; halving")
        free_memory(device)
        bs //= 2


def probe_step(model, loss_fn, batch, device, amp_dtype):
    """One forward+backward; returns the bytes it needed. A CPU has no allocator statistics: the
    RSS growth over the forward (the activations) counts twice, for backward. Gradients and
    AdamW's two moments, which do not exist yet, are counted from the parameters."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss0 = psutil.Process().memory_info().rss
    with autocast(device, amp_dtype):
        loss_sum, n = loss_fn(model, batch)
    rss1 = psutil.Process().memory_info().rss
    loss_sum.backward()
    model.zero_grad(set_to_none=True)  # the probe's gradients are not the run's
    del loss_sum
    state = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base + 2 * state
    return 2 * max(0, rss1 - rss0) + 3 * state


def fit_batch(model, loss_fn, worst, args, sources, *, device, amp_dtype, prec_why, state, log, ranks, unit):
    """Fit the run to the machine before the first step, and say so in one line: the micro-batch
    (choose_batch_size: the RAM/GPU table, then a real forward+backward on worst(bs), the largest
    items the run will see), the ranks' agreement on it, and on a CPU the precision
    (measure_precision, timed on the same batch). A resumed run keeps its checkpoint's choices.
    Returns (micro_bs, accum, amp_dtype, why): why = {"batch": ..., "precision": ...}."""

    def probe(bs, dt=amp_dtype):
        with side_effect_free(model, device):
            return probe_step(model, loss_fn, worst(bs), device, dt)
    micro_bs, accum, bs_why = choose_batch_size(args, sources, device, probe, log,
                                                (state["micro_bs"], state["accum"]) if state else None)
    micro_bs, accum = ranks.agree_batch(micro_bs, accum)
    amp_dtype, why = measure_precision(args, sources, device, model, lambda dt: probe(micro_bs, dt),
                                       state["args"]["precision"] if state else None)
    prec_why = why or prec_why
    if state and state["args"].get("precision") not in (None, args.precision):
        log(f"precision {args.precision}, where the checkpoint trained in {state['args']['precision']}: the run "
            "goes on, no longer bit-identical to an uninterrupted one")
    snap = memory_snapshot(device)
    log(f"device {device.type}, precision {args.precision} ({prec_why}); batch {micro_bs} x {accum} accumulation"
        + (f" x {ranks.world} processes" if ranks.world > 1 else "") + f" = {micro_bs * accum * ranks.world} "
        f"{unit} ({bs_why}); memory: RAM {snap['ram_pct']:.0f}% used"
        + (f", GPU {free_gpu_gb(device):.1f} GB free" if device.type == "cuda" else ""))
    return micro_bs, accum, amp_dtype, {"batch": bs_why, "precision": prec_why}


def memory_plan(args, model, optimizer, loss_fn, batch, *, device, log, **kw):
    """memory_plan.py's Plan of the step's peak, logged before the first step; `with plan.measure(size):` around a
    step measures the peak beside it, plan.figures() gives summary.json's memory fields. A trainer copied
    without memory_plan.py trains without one and says so; --plan and --measure-peak need it."""
    if importlib.util.find_spec("memory_plan") is None:  # (resolve_settings refused --plan, --measure-peak)
        log("memory plan: none (memory_plan.py is not beside the trainer)")
        return NoPlan(device, args.optim)
    return importlib.import_module("memory_plan").Plan(model, optimizer, loss_fn, batch, args=args, device=device,
                                                       log=log, **kw)


class NoPlan:
    """memory_plan.Plan's stand-in without memory_plan.py: nothing planned or measured."""

    def __init__(self, device, optim):
        self.device, self.optim = device, optim

    def measure(self, size):
        return contextlib.nullcontext()

    def figures(self, log=print):
        return {"optim": self.optim, "memory_plan_mb": None, "peak_tensor_mb": None,
                "peak_mem_mb": peak_memory_mb(self.device), "optimizer_state_mb": None}


def finished_before(out, status, step, log=print):
    """A re-run of a finished run: say so, leave its status.json and args.json as they were (status None: a rank
    that writes none)."""
    log(f"this run had already finished at step {step}: {Path(out) / 'summary.json'} is unchanged (to train it "
        "longer, re-run with a larger --epochs or --max-steps)")
    if status is not None:  # (a kill between summary.json and the last status write left another state)
        (restore_status if status.get("previous", {}).get("status.json", {}).get("state") == "finished"
         else update_status)(out, status, state="finished", eta_s=0)
    return 0


def plan_only(out, status, log=print):
    """--plan: the plan is printed; stop before the first step, nothing trained or saved (a run folder's
    status.json stays as it was)."""
    restore_status(out, status, state="planned")
    log("memory plan only (--plan): nothing trained, no checkpoint written")
    return 0


class StepBatches(torch.utils.data.Dataset):
    """Item i = fn(step=i, **kw), the batch of step i, for a DataLoader whose --workers build
    batches ahead. A module function plus plain data pickles for spawn (Windows, macOS)."""

    def __init__(self, fn, **kw):
        self.fn, self.kw = fn, kw

    def __getitem__(self, i):
        return self.fn(step=i, **self.kw)


def quiet_worker(_):
    """Loader workers ignore Ctrl-C: the main process handles it (it saves, then ends them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# memory

def free_gpu_gb(device, cap_gb=None):
    """Free memory on a CUDA device in GB (None on CPU); under a --gpu-memory cap, at most what is left of it."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if cap_gb:
        free = min(free, cap_gb * 2**30 - torch.cuda.memory_reserved(device))
    return free / 2**30


def memory_snapshot(device):
    """RAM and GPU memory now (process RSS, system %, GPU allocated and % of the card)."""
    vm = psutil.virtual_memory()
    snap = {"ram_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "ram_pct": vm.percent,
            "gpu_mb": None, "gpu_pct": None}
    if device.type == "cuda":
        snap["gpu_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        snap["gpu_pct"] = round(100 * torch.cuda.memory_reserved(device) / torch.cuda.mem_get_info(device)[1], 1)
    return snap


def peak_memory_mb(device, peak=None):
    """Peak memory of this run: GPU max allocated on CUDA (with what memory_plan.StepPeak `peak` saw
    before it reset those statistics), else the process's peak RSS."""
    if device.type == "cuda":
        return round(max(torch.cuda.max_memory_allocated(device), getattr(peak, "run_peak", 0)) / 2**20, 1)
    try:  # Linux: VmHWM is this process's own high-water mark; ru_maxrss would carry over the
        # peak of the parent it was forked from (e.g. pytest, or `memory_optimizer.py start`)
        with open("/proc/self/status") as f:
            return round(next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024, 1)
    except (OSError, StopIteration):
        pass
    mi = psutil.Process().memory_info()
    peak = getattr(mi, "peak_wset", None)  # Windows
    if peak is None:  # macOS: ru_maxrss, in bytes there
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20, 1)


def keep_heap_small(threshold=1 << 20):
    """Linux (glibc): allocations >= threshold go to mmap and back to the OS when freed (glibc
    otherwise raises that threshold after large frees, and micro-batches of varying length leave
    heap gaps that RSS never returns): train_sft.py's peak RSS 1,338 -> 485 MB at 0.70x speed."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: no mallopt (musl, macOS, Windows)
        return ctypes.CDLL(None).mallopt(-3, threshold) == 1  # -3 = M_MMAP_THRESHOLD
    return False


def free_memory(device):
    """gc (Python cycles holding tensors), the CUDA caching allocator's unused blocks, and on Linux the heap's
    free pages that glibc keeps in RSS after tensors are freed (13-40 MB after train_lm.py's loop, docs/lm.md)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: no malloc_trim (musl, macOS, Windows)
        ctypes.CDLL(None).malloc_trim(0)


def check_memory(watch, device, log=print):
    """Every `watch['every']` seconds compares RAM/GPU use to the thresholds
    and frees caches when over. watch = {'every', 'ram', 'gpu', 'last'} (mutated)."""
    now = time.monotonic()
    if now - watch["last"] < watch["every"]:
        return
    watch["last"] = now
    snap = memory_snapshot(device)
    over = []
    if snap["ram_pct"] > watch["ram"]:
        over.append(f"RAM {snap['ram_pct']:.0f}% > {watch['ram']:.0f}%")
    if snap["gpu_pct"] is not None and snap["gpu_pct"] > watch["gpu"]:
        over.append(f"GPU {snap['gpu_pct']:.0f}% > {watch['gpu']:.0f}%")
    swap = psutil.swap_memory()
    if swap.total and swap.percent > watch["swap"]:
        over.append(f"swap {swap.percent:.0f}% > {watch['swap']:.0f}%")
    if over:
        free_memory(device)
        log(f"memory monitor: {', '.join(over)}: freed Python garbage and CUDA cache "
            f"(now RAM {psutil.virtual_memory().percent:.0f}%)")


# -----------------------------------------------------------------------------
# RNG, checkpoints and resume

def seed_everything(seed):
    random.seed(seed)  # Python, numpy and torch (every CUDA device too)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """All RNG states as weights_only-loadable data (numpy's array becomes a tensor)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)),
                                                     pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """The inverse of rng_state."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU that was visible when it was saved: a resume may see fewer
        for i, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, i)


def training_state(model, optimizer, scheduler, scaler, **plain):
    """What a checkpoint holds: the state_dicts (and the optimizer's kind), every RNG state, and the trainer's
    plain data (step, position in the epoch, best metric, ...)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "optimizer_kind": type(optimizer).__name__, "scaler": scaler.state_dict(), "rng": rng_state(), **plain}


def restore_training_state(state, model, optimizer, scheduler, scaler, log=print):
    """The inverse of training_state, for a resume: after it, the run continues as if never stopped.
    An --lr typed on resume wins (the schedule goes on, scaled to it) and is said. Returns (wall_s,
    train_s, samples) of the run's earlier segments, zeros without a state."""
    if not state:
        return 0.0, 0.0, 0
    want = type(optimizer).__name__  # a checkpoint without optimizer_kind: AdamW, or AdamW8bit by its --optim
    had = state.get("optimizer_kind") or {"adamw8bit": "AdamW8bit"}.get(state.get("args", {}).get("optim"), "AdamW")
    if had != want:
        how = {"AdamW": "--optim adamw", "AdamW8bit": "--optim adamw8bit"}.get(had, "--resource-efficient")
        raise UserError(f"the checkpoint being resumed was trained with {had} ({how}), this run builds {want}: resume "
                        "with the flags it was trained with, or start over with --no-resume or a new --out")
    model.load_state_dict(state["model"])
    peak_lrs = [group.get("initial_lr") for group in optimizer.param_groups]  # this command's, set by the scheduler
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    changed = [(g["initial_lr"], lr) for g, lr in zip(optimizer.param_groups, peak_lrs)
               if lr is not None and g.get("initial_lr") not in (None, lr)]
    if changed:  # LambdaLR: lr = base_lr x factor(step), so the new base scales the rest of the schedule
        for i, (group, lr) in enumerate(zip(optimizer.param_groups, peak_lrs)):
            group["lr"] *= lr / group["initial_lr"]
            group["initial_lr"] = scheduler.base_lrs[i] = lr
        log(f"learning rate {changed[0][1]:g} as typed, where the checkpoint trained at {changed[0][0]:g}: the "
            "schedule goes on at the new rate; the run is no longer bit-identical to an uninterrupted one")
    if state["scaler"]:  # a disabled scaler (fp32, bf16) saved {}: an fp16 resume starts a fresh scale
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state.get("wall_s", 0.0), state.get("train_s", 0.0), state.get("samples", 0)


def rebatch(scheduler, step, pos, *, per_epoch, total, log=print):
    """A resume with a new effective batch: the checkpoint's (step, pos: batches of this epoch done) moved to
    the same share of the epoch and run, for per_epoch and total = (old, new) batches an epoch and steps in the
    run, and the lr with it (LambdaLR). Up to one new batch of the epoch is then seen twice or not at all."""
    new_step, new_pos = step * total[1] // total[0], pos * per_epoch[1] // per_epoch[0]
    scheduler.last_epoch = new_step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(new_step)
    log(f"new effective batch: step {step} of {total[0]} is now step {new_step} of {total[1]} " + (
        f"(batch {new_pos} of {per_epoch[1]} in this epoch), the learning rate schedule moved with it" if pos or
        new_step != step else "(the run counts steps, --max-steps: each step now trains on the new batch)"))
    return new_step, new_pos


def atomic_save(obj, path, also=None):
    """torch.save to a temp file, fsync, os.replace, then <name>.sha256: never half a file (a checkpoint, an
    export). `also` (best.pt) gets its copy before `path` appears, so it is never older than its step. A
    full disk is one UserError; the partial file goes, earlier files stay."""
    tmp = path.with_name(path.name + ".tmp")
    extra = also.with_name(also.name + ".tmp") if also else None
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # a crash after os.replace must not leave an empty file behind
        if also:
            shutil.copyfile(tmp, extra)
            os.replace(extra, also)
            write_checksum(also)
        os.replace(tmp, path)
        write_checksum(path)
    except (OSError, RuntimeError) as e:
        for t in (tmp, extra):
            if t:
                t.unlink(missing_ok=True)
        cause = e  # "no space left", or what it was raised from (torch.save: a RuntimeError from the OSError)
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        need, free = tensor_bytes(obj) / 2**20, shutil.disk_usage(path.parent).free / 2**20
        raise UserError(f"the disk is full: {path.name} needs about {need:,.0f} MB in {path.parent} ({free:,.0f} "
                        "MB free); free some space and re-run the same command (it resumes from the last checkpoint)"
                        ) from None


def tensor_bytes(obj):
    """Bytes of every tensor in a nest of dicts/lists/tuples: about a checkpoint's size."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_checksum(path):
    """<path>.sha256 := the file's SHA-256, written atomically. A kill between a checkpoint's
    rename and this one leaves a whole file with an old or no checksum: an old one fails the
    check (that file is passed over), no checksum is trusted (files from before checksums)."""
    side = path.with_name(path.name + ".sha256")
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(file_sha256(path) + "\n")
    os.replace(tmp, side)


def _ckpt_step(path):
    """The step N of ckpt_stepN.pt, for numeric sorting."""
    return int(path.stem.split("step")[1])


def save_checkpoint(out, step, state, keep, protect=None, best=False, log=print):
    """<out>/checkpoints/ckpt_step{N:08d}.pt, atomically; keep the newest `keep`, never delete
    `protect` (the file this run resumed from); best=True also writes best.pt."""
    d = Path(out) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    ckpts = sorted(d.glob(CKPT_GLOB), key=_ckpt_step)
    if ckpts:
        need, free = ckpts[-1].stat().st_size * (2 if best else 1), shutil.disk_usage(d).free
        if free < 3 * need:
            log(f"warning: {free / 2**20:,.0f} MB free in {d}, and a checkpoint takes {need / 2**20:,.0f} MB; "
                "free some space (or lower --keep) before the disk fills")
    path = d / f"ckpt_step{step:08d}.pt"
    atomic_save(state, path, also=d / "best.pt" if best else None)
    for old in sorted(d.glob(CKPT_GLOB), key=_ckpt_step)[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


class ChecksumMismatch(Exception):
    """A checkpoint whose bytes are not the ones saved (<name>.sha256 disagrees)."""


def load_checkpoint(path):
    """A checkpoint, never running code from it (weights_only=True) nor trusting bytes it has not
    verified (<name>.sha256: a flipped byte inside a tensor passes the zip format's checks)."""
    side = Path(path).with_name(Path(path).name + ".sha256")
    if side.is_file():
        want, got = side.read_text().strip(), file_sha256(path)
        if got != want:
            raise ChecksumMismatch(f"SHA-256 {got[:16]}... is not the {want[:16]}... saved in {side.name}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run_model(run, flag, trainer, key, resume=None):
    """The model a run folder serves: --resume PATH, else its best.pt, else its newest loadable
    checkpoint. Returns (state, path); no checkpoint, or one made by another trainer (it lacks
    `key`, the entry this trainer's model is built from), is a UserError naming `flag`."""
    run, best, state = Path(run), Path(run) / "checkpoints" / "best.pt", None
    warn = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if resume is None and best.is_file():
        try:
            state, path = load_checkpoint(best), best
        except Exception as e:  # a damaged best.pt: say so, and serve the newest step checkpoint
            warn(f"warning: {best} is unreadable ({type(e).__name__}); using the newest checkpoint")
    if state is None:
        state, path = find_checkpoint(run, argparse.Namespace(resume=resume, no_resume=False,
                                                              trainer=trainer if resume else None), warn)
    if state is None:
        n = len(list((run / "checkpoints").glob("*.pt")))
        if n:
            raise UserError(f"{flag} {run}: none of its {n} checkpoint file(s) is loadable (see the warnings); "
                            f"re-run the training command to make a new one, or pick another run")
        raise UserError(f"{flag} {run}: no checkpoint there; train first: python {TRAINERS[trainer]} --quick "
                        f"--out {run}")
    where = f"--resume {path}" if resume else f"{flag} {run}: {path}"
    if not isinstance(state, dict) or key not in state:
        raise UserError(f"{where} is not a {TRAINERS[trainer]} checkpoint")
    check_trainer(saved_by(state), trainer, where)
    return state, path


def saved_by(state):
    """The trainer name a checkpoint's args record (None for a file without one)."""
    args = state.get("args") if isinstance(state, dict) else None
    return args.get("trainer") if isinstance(args, dict) else None


def check_trainer(found, trainer, where):
    """UserError when `found` (who wrote a run folder or checkpoint) is another trainer (the LM
    and SFT share one model); trainer=None checks nothing."""
    if trainer is None or found in (None, trainer) or {found, trainer} <= {"lm", "sft"}:
        return
    if found not in TRAINERS:
        raise UserError(f"{where}: written by an unknown trainer {found!r}; pick another")
    raise UserError(f"{where}: made by {TRAINERS[found]}, not {TRAINERS[trainer]}; pick a "
                    f"{TRAINERS[trainer]} run (or another --out for a new one)")


def find_checkpoint(out, args, log=print):
    """The checkpoint to resume from: --resume PATH, else the newest loadable one in <out>.
    A truncated or corrupt newest file gives a warning and the previous one is used.
    Returns (state, path) or (None, None)."""
    if args.resume:
        p = Path(args.resume)
        pick = "give a ckpt_step*.pt or best.pt from a run's checkpoints/ folder"
        if not p.is_file():
            raise UserError(f"--resume {p}: " + (f"a folder; {pick}, or --out RUN to resume a run's newest"
                                                 if p.is_dir() else f"file not found; {pick}"))
        try:
            state = load_checkpoint(p)
        except Exception as e:
            # torch's own message advises weights_only=False, i.e. running the file's code: not here
            why = (f"{type(e).__name__}: {e}" if isinstance(e, (ChecksumMismatch, OSError)) else
                   "it holds pickled code, which is never run" if "GLOBAL" in str(e) else
                   "damaged, or not a file torch.save wrote")
            raise UserError(f"--resume {p}: not a loadable checkpoint ({why}); {pick}")
        trainer = getattr(args, "trainer", None)
        if not isinstance(state, dict):  # e.g. a bare tensor saved with torch.save
            raise UserError(f"--resume {p} is not a {TRAINERS.get(trainer, 'trainer')} checkpoint "
                            f"(it holds a {type(state).__name__})")
        check_trainer(saved_by(state), trainer, f"--resume {p}")
        return state, p
    if args.no_resume:
        return None, None
    d = Path(out) / "checkpoints"
    for p in sorted(d.glob(CKPT_GLOB), key=_ckpt_step, reverse=True):
        try:
            state = load_checkpoint(p)
        except Exception as e:
            why = str(e) if isinstance(e, ChecksumMismatch) else type(e).__name__
            log(f"warning: {p} is unreadable ({why}); trying the previous checkpoint")
            continue
        if not isinstance(state, dict):
            log(f"warning: {p} holds a {type(state).__name__}, not a checkpoint; trying the previous one")
            continue
        check_trainer(saved_by(state), getattr(args, "trainer", None), f"--out {out}: {p}")
        return state, p
    return None, None


# -----------------------------------------------------------------------------
# run folder: args.json, status.json, metrics.jsonl, train.log, summary.json

def open_run(args, sources):
    """After the flags and data are checked, before anything is written: the run folder (checked writable), the
    seed, the device, the checkpoint to resume. Returns (out, setup_device's tuple, state, resumed_from, notes)."""
    if args.resume is not None and args.no_resume:
        raise UserError(f"{f'--resume {args.resume}'.strip()} --no-resume: pick one (resume, or start over)")
    notes, out, found = [], Path(args.out) if args.out else None, None
    args.identity = run_identity(args)  # status.json keeps it: what a re-run without --out looks for
    if out is None and not (args.no_resume or args.resume or args.plan):  # --plan never takes over a run
        out = found = newest_run(args.trainer, identity=args.identity)
    if out is None:
        out = Path("runs") / f"{args.trainer}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        done = None if args.no_resume or args.plan else newest_run(args.trainer, identity=args.identity, finished=True)
        notes.append(f"a new run folder: {out}" + ("" if args.plan else " (re-run this command to resume it)") + (
            f"; {done}, this command's newest run, has finished: to train it longer, give --out {done} and a "
            "larger --epochs or --max-steps" if done else ""))
    args.out = str(out)
    check_out_writable(out)
    check_trainer(read_status(out).get("trainer"), args.trainer, f"--out {out}")
    seed_everything(args.seed)
    device = setup_device(args, sources)
    state, resumed_from = find_checkpoint(out, args, notes.append)
    if found:  # the first line
        notes.insert(0, f"resuming {found}, the newest unfinished run of this command under runs/ (--no-resume starts "
                     "a new folder)" + ("" if state else "; it has no checkpoint yet: training starts at step 0"))
    was = state["args"] if isinstance(state, dict) and isinstance(state.get("args"), dict) else {}
    changed = [f"--{k.replace('_', '-')} {v} (it had {'none' if was[k] is None else was[k]})"
               for k, v in vars(args).items() if sources.get(k) == "flag" and was.get(k, v) != v and k not in SAID]
    if changed:
        notes.append(f"typed, and not what the checkpoint trained with: {', '.join(changed)}; they apply from here "
                     "on, but for the vocabulary (the checkpoint's) and the model's shape (a change is refused): the "
                     "run is no longer bit-identical to an uninterrupted one")
    return out, device, state, resumed_from, notes


# typed on resume, not listed as changed: the run folder's flags, and what fit_batch and restore_training_state say
SAID = {"out", "resume", "no_resume", "config", "batch_size", "grad_accum", "lr", "precision", "plan", "eval_only"}


# flags that steer a run, not what it trains: a re-run without --out resumes the run whose other settings match
RUN_CONTROL = {"out", "resume", "no_resume", "save_every", "keep", "config", "epochs", "max_steps", "batch_size",
               "grad_accum", "lr", "clip", "precision", "device", "eval_every", "log_every", "bad_rows", "sha256",
               "max_download_mb", "download_dir", "ram_threshold", "gpu_threshold", "swap_threshold", "mem_check_every",
               "grad_checkpointing", "optim", "gpu_memory", "max_memory", "measure_peak", "plan", "workers",
               "pin_memory", "effective_batch", "identity", "tensorboard", "eval_only"}


def run_identity(args):
    """A run's identity for status.json: a hash of its settings but RUN_CONTROL, as open_run sees them."""
    shape = {k: v for k, v in vars(args).items() if k not in RUN_CONTROL}
    return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_out_writable(out):
    """Fail early (exit 2) if --out cannot be a run folder, before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; pick another --out")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not a writable folder; pick another --out")
    # checkpoints/ too, by writing a file there: else a read-only folder shows only at the first
    # save, after the training it was meant to keep (os.access says yes to root; a write is the test)
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            try:
                tempfile.TemporaryFile(dir=d).close()
            except OSError as e:
                raise UserError(f"--out {out}: cannot write in {d} ({e.strerror}); make it writable "
                                "(chmod u+w) or pick another --out")
        elif d.exists():
            raise UserError(f"--out {out}: {d} is not a folder; move it away or pick another --out")


def prepare_run_dir(out, no_resume):
    """Create the run folder. With --no-resume, an earlier run's checkpoints and metrics are
    moved to *.old-<time> rather than deleted or overwritten."""
    out = Path(out)
    if (out / "status.json").exists():
        st = read_status(out)
        # a copy of a live run folder names the original as its "out": that trainer is not training this one
        same = isinstance(st.get("out"), str) and Path(st["out"]).resolve() == out.resolve()
        if same and st.get("pid") != os.getpid() and st.get("state") in ("starting", "running") and process_alive(st):
            raise UserError(f"--out {out} is being trained by pid {st['pid']} right now; wait for it, "
                            f"stop it (python memory_optimizer.py stop {out}) or pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror}); pick another --out")
    moved = []
    if no_resume:
        stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
        for name in ("checkpoints", "metrics.jsonl"):
            if (out / name).exists():
                (out / name).rename(out / f"{name}.old-{stamp}")
                moved.append(f"{name}.old-{stamp}")
    (out / "STOP").unlink(missing_ok=True)  # a stop request belongs to the run it stopped
    # what a killed save left half-written: it only holds disk space (no live trainer writes here)
    for tmp in [*out.glob("*.tmp"), *(out / "checkpoints").glob("*.tmp")]:
        tmp.unlink(missing_ok=True)
    return moved


def read_status(out, name="status.json"):
    """<out>/status.json (or another of its JSON files) as a dict; {} when there is none or it is unreadable
    (an unreadable status.json proves no live trainer, and start_run writes a new one)."""
    try:
        st = json.loads((Path(out) / name).read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return st if isinstance(st, dict) else {}


def newest_run(trainer, root="runs", identity=None, finished=False):
    """The run folder under `root` that `trainer` started last (None without one; a --plan folder never
    counts): what a serving command (--suggest, --transcribe) uses when no --out is given. With `identity`
    (run_identity), the newest that command started and did not finish (killed, stopped, failed), that no
    live process trains: where a re-run without --out goes on; with finished=True, the newest it finished."""
    runs = []
    for d in Path(root).glob("*"):
        st = read_status(d)
        state = st.get("state")
        if st.get("trainer") == trainer and isinstance(st.get("started"), (int, float)) and state != "planned" and (
                identity is None or st.get("identity") == identity and ((state == "finished") if finished else (
                    state != "finished" and not (state in ("starting", "running") and process_alive(st))))):
            runs.append((st["started"], d))
    return max(runs)[1] if runs else None


def process_alive(status):
    """True while status.json's process lives: its pid, made when pid_created says (a recycled pid is not)."""
    try:
        proc = psutil.Process(status["pid"])
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - status["pid_created"]) <= 1
    except (psutil.Error, KeyError, TypeError, ValueError, OverflowError):
        return False


def write_json_atomic(path, obj):
    """Write JSON via a temp file and os.replace, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    # no fsync: status.json is rewritten every log interval; os.replace alone keeps it whole
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_args(out, args, sources, chosen):
    """args.json: every resolved setting, where it came from, and what auto-tuning chose."""
    settings = {k: {"value": v, "source": sources.get(k, "default")} for k, v in sorted(vars(args).items())}
    write_json_atomic(Path(out) / "args.json", {"settings": settings, "chosen": chosen,
                                                 "argv": sys.argv, "python": sys.executable})


def update_status(out, status, **changes):
    """Merge `changes` into status and write status.json atomically (but "previous": for restore_status)."""
    status.update(changes, updated=time.time())
    write_json_atomic(Path(out) / "status.json", {k: v for k, v in status.items() if k != "previous"})


def restore_status(out, status, **otherwise):
    """Put back the status.json and args.json start_run found (a run that trained nothing leaves what was
    saved as it was), else update_status(**otherwise)."""
    if not status.get("previous", {}).get("status.json"):
        return update_status(out, status, **otherwise)
    for name, content in status["previous"].items():
        if content:
            write_json_atomic(Path(out) / name, content)


def start_run(out, args, trainer, metric_name, notes=()):
    """Once all the trainer's checks have passed (nothing is written before):
    claim the run folder, open train.log (and log `notes`), write the first status.json,
    install the stop handlers. Returns (log, status, stop)."""
    previous = {} if args.no_resume else {name: read_status(out, name) for name in ("status.json", "args.json")}
    moved = prepare_run_dir(out, args.no_resume)
    log = make_logger(out)
    for note in [*notes, *([f"--no-resume: earlier files kept as {', '.join(moved)}"] if moved else [])]:
        log(note)
    # pid + its create time identify the process (process_alive; memory_optimizer.py's process_is_trainer)
    status = {"state": "starting", "pid": os.getpid(), "pid_created": psutil.Process().create_time(),
              "trainer": trainer, "identity": getattr(args, "identity", None), "out": str(Path(out).resolve()),
              "started": time.time(), "log": str((Path(out) / "train.log").resolve()), "metric_name": metric_name}
    if previous.get("status.json", {}).get("metric_name") == metric_name:  # resumed: its last evaluation's figure
        status["metric"] = previous["status.json"].get("metric")
    update_status(out, status)
    status["previous"] = previous
    return log, status, install_stop_handlers()


@contextlib.contextmanager
def recording_failures(out, status):
    """Around a trainer's training: if it raises, status.json says so (`failed` with the error,
    or `stopped` after a second Ctrl-C) before the exception goes on; a user mistake before the first step
    (a flag the checkpoint cannot honour) leaves the status.json start_run found."""
    try:
        yield
    except KeyboardInterrupt:
        update_status(out, status, state="stopped")
        raise
    except Exception as e:
        try:
            error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            (restore_status if isinstance(e, UserError) and status.get("state") == "starting" else update_status)(
                out, status, state="failed", error=error)
        except OSError:  # a full disk may refuse status.json too: the error itself still reaches the user
            pass
        raise


def memory_watch(args):
    """The state check_memory keeps between calls, from the memory flags."""
    return {"every": args.mem_check_every, "ram": args.ram_threshold, "gpu": args.gpu_threshold,
            "swap": args.swap_threshold, "last": time.monotonic()}


def progress_bar(total, initial):
    """The training bar: redraws often on a terminal, every 30 s into a log file."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 30)


def log_step(log, step, total, loss, lr, *, elapsed, steps, items, unit, device, extra="", tb=None):
    """The one plain line of every --log-every interval, in train.log and above the bar, with
    fixed fields: step, loss, lr, ms/step and items/s (over this process's `steps` steps and
    `items` items in `elapsed` seconds), memory now; the same to TensorBoard under --tensorboard
    (tb: tensorboard()'s writer). Returns memory_snapshot's figures."""
    mem = memory_snapshot(device)
    where = f"GPU {mem['gpu_mb']:.0f}" if mem["gpu_mb"] is not None else f"RAM {mem['ram_mb']:.0f}"
    ms, per_s = 1e3 * elapsed / max(1, steps), items / max(1e-9, elapsed)
    log(f"step {step:>6}/{total} | loss {loss:.4f} | lr {lr:.2e} | {ms:.0f} ms/step | "
        f"{per_s:,.0f} {unit}/s | {where} MB{extra}")
    if tb is not None:
        for name, value in (("train/loss", loss), ("train/lr", lr), ("train/ms_per_step", ms),
                            (f"train/{unit}_per_s", per_s), (f"memory/{where.split()[0]}_mb", float(where.split()[1]))):
            tb.add_scalar(name, value, step)
    return mem


def tensorboard(args, out):
    """--tensorboard: a SummaryWriter into <out>/tb that log_step and append_metrics feed, else
    None; torch.utils.tensorboard is imported only then (resolve_settings checked it is there)."""
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(Path(out) / "tb"))


def append_metrics(out, record, tb=None):
    """One JSON record per line to <out>/metrics.jsonl; with tb (--tensorboard), its numbers as
    scalars at its step too (a validation record: the metric)."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if tb is not None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tb.add_scalar(f"eval/{key}", value, record["step"])
        tb.flush()  # an evaluation is rare and the point of the board: show it now


def truncate_metrics(out, step):
    """On resume from step N, drop records a killed run wrote after its checkpoint at N: they will be written
    again, identically, by the resumed run (a line a kill cut in half too). A kill mid-rewrite keeps the old file."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # half-written by a killed run (always the last line)
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def make_logger(out):
    """log(msg): print above the tqdm bar and append to <out>/train.log with a timestamp."""
    path = Path(out) / "train.log"

    def log(msg):
        from tqdm import tqdm
        tqdm.write(str(msg))
        with open(path, "a") as f:
            f.write(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")
    return log


def count_params(model):
    """(all parameters, trainable parameters)."""
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad)


# -----------------------------------------------------------------------------
# stopping: signals and the STOP file

def install_stop_handlers():
    """SIGTERM/SIGINT (and CTRL_BREAK on Windows) ask the loop to stop after the current step.
    A second Ctrl-C stops at once. Returns the flag dict the loop polls via stop_requested."""
    flag = {"stop": None}

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if hasattr(signal, "SIGBREAK"):
        signal.signal(signal.SIGBREAK, handler)
    return flag


def stop_requested(flag, out):
    """True after a signal, or when `memory_optimizer.py stop` left a STOP file (works where signals
    can't reach a detached process, e.g. Windows)."""
    if not flag["stop"] and (Path(out) / "STOP").exists():
        flag["stop"] = "STOP file"
    return flag["stop"]


# -----------------------------------------------------------------------------
# one process, or several under torchrun (ddp.py)

class OneProcess:
    """What a trainer asks of its process group, for a plain run: one process, nothing to agree
    on, every method a no-op. Under torchrun, ddp.Ranks does the same with the work in it."""
    rank, world, local_rank, is_main = 0, 1, 0, True

    def start(self, out, args, trainer, metric_name, notes, device):
        return start_run(out, args, trainer, metric_name, notes)

    def end(self):
        pass

    def wrap(self, model):
        return model, None  # (the model that trains, its no_sync for train_step)

    def all(self, value, op):
        return value

    def agree_batch(self, micro_bs, accum):
        return micro_bs, accum

    def barrier(self):
        pass

    def seed_step(self, seed, step):
        pass  # one process: its RNG stream is in the checkpoint

    def slice(self, items):
        return items


def process_group(args):
    """OneProcess, or under torchrun (WORLD_SIZE > 1) ddp.Ranks: the only place ddp.py is imported."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return OneProcess()
    return opt_in("ddp", "torchrun").Ranks(args)


def check_world_size(state, resumed_from, world):
    """A checkpoint resumes only on as many processes as wrote it: the batches and the ranks'
    slices of them depend on the process count."""
    was = state.get("world_size", 1) if isinstance(state, dict) else 1
    if state is not None and was != world:
        raise UserError(f"{resumed_from} was trained on {was} process(es), this is {world}; "
                        f"resume with the same --nproc_per_node, or use a new --out")
