"""common.py -- the pieces every lean-train trainer shares.

Plain functions with explicit arguments: no Trainer class, no callbacks, no hidden globals.
A trainer keeps its own outer loop (epochs, eval, log and save cadence) and calls in here for
what is easy to get wrong:

    flags ............ make_parser, resolve_settings (defaults < optimal_config.json < flags)
    device/precision . setup_device
    the step ......... train_step (autocast, exact accumulation, unscale, clip, step, OOM retry)
    batch size ....... choose_batch_size (RAM/GPU table, then a real forward+backward probe)
    memory ........... memory_snapshot, peak_memory_mb, free_memory, check_memory, keep_heap_small
    checkpoints ...... training_state, save_checkpoint (atomic + rotation), find_checkpoint (resume,
                       fallback), restore_training_state
    run folder ....... open_run, start_run, recording_failures, update_status, append_metrics,
                       write_summary, plot_progress, progress_bar
    stopping ......... install_stop_handlers, stop_requested (SIGTERM/SIGINT/CTRL_BREAK/STOP file)

Each function says who uses it; "every trainer" means train_gru.py, train_classifier.py,
train_asr.py, train_lm.py and train_sft.py. Starting, watching and stopping background runs is
memory_optimizer.py's (start|status|monitor|stop), which the launchers run.sh and
start_training.bat call.
"""
import argparse
import contextlib
import copy
import csv
import datetime
import errno
import hashlib
import http.client
import gc
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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent
TRAINERS = {"gru": "train_gru.py", "classifier": "train_classifier.py",
            "asr": "train_asr.py", "lm": "train_lm.py", "sft": "train_sft.py"}
CKPT_GLOB = "ckpt_step*.pt"


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad file). Printed as one line, exit code 2.
    Used by every trainer and memory_optimizer.py."""


def run_main(main):
    """User mistakes (UserError) exit 2 with one line.
    Used by every trainer's `if __name__ == "__main__"` and memory_optimizer.py."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except BrokenPipeError:  # `... status | head`: the reader left; nothing to report
        sys.stderr.close()
        sys.exit(0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank leaves without the interpreter's teardown: DDP keeps the gloo process
        # group alive past destroy_process_group, and its worker thread, letting go of the last
        # all_reduce's tensor during teardown, cannot take the GIL and aborts the process
        # ("terminate called without an active exception"): rank 1 in 7 of 30 runs with both
        # cores busy, 0 of 20 this way. Everything is written by now (each file is closed
        # after each write); only the output buffers are left to flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


# -----------------------------------------------------------------------------
# flags

class HelpFormat(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's layout and show every flag's default in --help (unless the help
    text already speaks of its default, or there is none worth showing).
    Used by make_parser; train_lm.py and train_sft.py (their subcommand parsers),
    memory_optimizer.py."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors.
    Used by make_parser; train_lm.py and train_sft.py (their subcommand parsers),
    memory_optimizer.py."""
    def error(self, message):  # one line, exit 2 (argparse would also print the whole usage)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description, trainer, *, epochs, lr, effective_batch, save_every=50, eval_every=0,
                log_every=10, keep=3):
    """Every trainer's parser starts here, so the same flag means the same thing everywhere.

    Trainer-specific defaults come in as arguments; trainers add their own flags afterwards.
    Used by every trainer.
    """
    p = Parser(description=description, allow_abbrev=False,
                formatter_class=HelpFormat)
    p.set_defaults(trainer=trainer, effective_batch=effective_batch,
                   # settings without a flag of their own: optimal_config.json and
                   # --resource-efficient set them, args.json records them
                   workers=0, pin_memory=False)
    g = p.add_argument_group("run folder and resume (the same on every trainer)")
    g.add_argument("--out", default=None,
                   help=f"run folder (default runs/{trainer}-<timestamp>); re-run the same "
                        "command to resume")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="resume from this checkpoint file instead of the newest in --out")
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
    g.add_argument("--epochs", type=pos_int, default=epochs, help="passes over the training data")
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
    g.add_argument("--clip", type=pos_float, default=1.0, help="gradient-norm clipping")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto = bf16 on CUDA where supported, else fp16 + GradScaler; fp32 on CPU")
    g.add_argument("--mixed_precision", dest="precision", action="store_const", const="auto",
                   help="the seeds' spelling of --precision auto")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available")
    g.add_argument("--eval-every", type=nonneg_int, default=eval_every, metavar="N",
                   help="evaluate every N optimizer steps (0 = at epoch end only)")
    g.add_argument("--log-every", type=pos_int, default=log_every, metavar="N",
                   help="log line + metrics.jsonl record every N optimizer steps")
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
                   help="free caches when swap use passes this percentage (swapping slows training "
                        "10-100x)")
    g.add_argument("--mem-check-every", type=pos_float, default=30.0, metavar="S",
                   help="seconds between memory checks")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (where the model supports it)")
    g.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps AdamW's two moments in 8 bits, per block of 2,048 values: about "
                        "2 bytes of optimizer state per weight instead of 8 (tensors under 4,096 values stay fp32)")
    g.add_argument("--gpu-memory", type=pos_float, default=None, metavar="GB",
                   help="CUDA: cap this process at GB of GPU memory (a 24 GB card then behaves like a 4 GB one, "
                        "or a laptop GPU keeps the rest for the desktop); the batch probe, the memory plan and "
                        "out-of-memory recovery all work under the cap")
    g.add_argument("--max-memory", type=pos_float, default=None, metavar="GB",
                   help="CPU: the most RAM this process may reach; the batch probe halves the micro-batch "
                        "until a step fits under it (accumulation keeps the effective batch)")
    g.add_argument("--plan", action="store_true",
                   help="print the memory plan (weights, gradients, optimizer state, activations) and stop "
                        "before the first step; `memory_optimizer.py plan TRAINER ...` runs this in a temporary folder")
    return p


def whole(s, what):
    """int(s), or argparse's one-line "must be ..." (not "invalid pos_int value").
    Used by pos_int, nonneg_int."""
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None


def pos_int(s):
    """argparse type: an integer >= 1.
    Used by make_parser; every trainer and memory_optimizer.py (flag types)."""
    v = whole(s, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s):
    """argparse type: an integer >= 0.
    Used by make_parser; train_gru.py, train_asr.py, train_lm.py, train_sft.py."""
    v = whole(s, "an integer, 0 or more")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return v


def pos_float(s):
    """argparse type: a finite number > 0.
    Used by make_parser; train_classifier.py, train_asr.py, train_lm.py, train_sft.py,
    memory_optimizer.py."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def percent(s):
    """argparse type: a percentage in (0, 100]. Used by make_parser (the memory thresholds)."""
    v = float(s)
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage in (0, 100], got {s}")
    return v


def batch_size_arg(s):
    """argparse type: 'auto' or a positive integer.
    Used by make_parser (--batch-size, --grad-accum)."""
    return "auto" if str(s) == "auto" else pos_int(s)


class _Typed(argparse.Namespace):
    """A namespace that ignores argparse.SUPPRESS: parsed into with every default suppressed, it
    ends up holding only what the command line itself set.
    Used by flag_reader's readers: explicit_flags and config_value."""

    def __setattr__(self, name, value):
        if value is not argparse.SUPPRESS:
            super().__setattr__(name, value)


def flag_reader(parser):
    """A copy of `parser` that reads only what a command line sets: every default is
    argparse.SUPPRESS, and a bad value raises argparse.ArgumentError instead of exiting.
    Used by explicit_flags and resolve_settings.
    """
    reader = copy.deepcopy(parser)  # set_defaults changes the parser it is called on
    reader.set_defaults(**dict.fromkeys(vars(parser.parse_known_args([])[0]), argparse.SUPPRESS))
    reader.exit_on_error = False
    return reader


def explicit_flags(parser, argv):
    """The dests the user typed on the command line (so config/presets never override them);
    an alias (--batch_size) counts as its dest.
    Used by resolve_settings."""
    return set(vars(flag_reader(parser).parse_known_args(argv, namespace=_Typed())[0]))


def config_value(reader, key, value):
    """An optimal_config.json value, converted and checked as if typed: a key is the dest of the
    flag --key-with-dashes. A setting without such a flag (workers, pin_memory, a flag that takes
    no value) is returned as it is. Raises ValueError for a value the flag refuses.
    reader = flag_reader(parser).
    Used by resolve_settings."""
    flag = "--" + key.replace("_", "-")
    try:
        typed, rest = reader.parse_known_args([flag, str(value)], namespace=_Typed())
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


def resolve_settings(parser, argv, log=print, modes=None):
    """Parse argv, then layer optimal_config.json and --resource-efficient under the flags.

    modes(args, sources, log), when given, replaces the generic --resource-efficient layer
    (train_sft.py: the seed's exact fine-tuning table and its sibling modes).

    Returns (args, sources): sources[name] is "default", "optimal_config.json", "flag",
    "resource-efficient" or (filled in later) "auto"/"checkpoint". Only public argparse: a copy
    of the parser with every default suppressed tells what was typed (flag_reader).
    Used by every trainer.
    """
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv)
    sources = {k: ("flag" if k in given else "default") for k in vars(args)}

    cfg_path = Path(args.config)
    if cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text())
            section = cfg["trainers"][args.trainer]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"--config {cfg_path}: not a valid optimal_config.json ({e!r}); "
                            "regenerate it with `python memory_optimizer.py config`")
        applied, reader = [], flag_reader(parser)
        for key, entry in section.items():
            if key in sources and sources[key] == "default":
                value = entry if not isinstance(entry, dict) else \
                    entry.get("quick_value", entry["value"]) if args.quick else entry["value"]
                try:  # the same checks as a typed flag
                    value = config_value(reader, key, value)
                except ValueError as e:
                    raise UserError(f"--config {cfg_path}: {args.trainer}.{key} = {value!r} is invalid "
                                    f"({e}); regenerate it with `python memory_optimizer.py config`")
                setattr(args, key, value)
                sources[key] = "optimal_config.json"
                applied.append(f"{key}={value}")
        if applied:
            log(f"settings from {cfg_path}: {', '.join(applied)} (flags override these)")
    elif "config" in given:
        raise UserError(f"--config {cfg_path}: file not found; create it with "
                        f"`python memory_optimizer.py config --out {cfg_path}` or drop the flag")

    if modes is not None:
        modes(args, sources, log)
    elif args.resource_efficient:
        apply_resource_efficient(args, sources, log)
    if args.resource_efficient and keep_heap_small():
        log("--resource-efficient: tensors of 1 MB and more go back to the OS when freed "
            "(glibc mmap threshold fixed at 1 MB)")
    return args, sources


def resource_efficient_eval(args, sources, steps_per_epoch, log=print):
    """--resource-efficient evaluates twice as often: with evaluation at epoch end only
    (--eval-every 0), that means every half epoch.
    Used by every trainer, once steps/epoch is known."""
    if args.resource_efficient and args.eval_every == 0 and sources.get("eval_every") != "flag":
        args.eval_every, sources["eval_every"] = max(1, steps_per_epoch // 2), "resource-efficient"
        log(f"--resource-efficient: evaluating every {args.eval_every} steps (half an epoch)")


def apply_resource_efficient(args, sources, log=print):
    """The --resource-efficient preset, applied before anything is built; flags typed by the
    user win. The batch halving happens in choose_batch_size (it needs the chosen batch).
    Used by resolve_settings (when a trainer passes no modes)."""
    wanted = [("ram_threshold", 70.0), ("gpu_threshold", 75.0), ("swap_threshold", 30.0), ("mem_check_every", 15.0),
              ("workers", 1), ("pin_memory", False),
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
    log("--resource-efficient changes:")
    for key, before, after, note in rows:
        log(f"  {key:<20} {str(before):>8} -> {str(after):<8} {note}")


# -----------------------------------------------------------------------------
# data ingress: one fetch for URLs, one reader for record files

FETCH_TIMEOUT_S = 30  # per socket operation: a stalled server fails instead of hanging the run


def is_url(s):
    """Used by fetch_data, train_lm.py and train_asr.py (which treat a URL's file differently)."""
    return urllib.parse.urlsplit(str(s)).scheme.lower() in ("http", "https")


class RedirectRefused(Exception):
    """A redirect to a scheme other than http(s) (file:, ftp:): never followed. Used by fetch."""


class HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp: too; a data URL may only lead to http(s). Used by fetch."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise RedirectRefused(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_name(url):
    """`<8 hex of the URL's SHA-256>-<sanitised basename>`: two URLs ending in the same file name
    (every mirror's data.jsonl) never share a file. The extension survives: the reader needs it.
    Used by fetch and fetch_data."""
    base = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base[-100:]}"


def file_sha256(path):
    """Hex SHA-256 of a file, read 1 MB at a time. Used by fetch and fetch_data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def looks_like_html(path):
    """True when a file starts like an HTML page (what a server sends for a missing file or a
    login wall). Used by fetch."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def fetch(url, dest_dir, flag="--data", *, sha256=None, max_bytes=200 * 2 ** 20, log=print, timeout=FETCH_TIMEOUT_S,
          show_bar=True):
    """Fetch an http(s) URL into dest_dir and return the file's Path; a local file or folder
    path is returned as it is. Used by fetch_data (every trainer's data flags) and tests.

    The bytes go to <name>.part and are renamed to <name> only when complete (and matching
    `sha256` when given), so a file under its final name is always whole. An interrupted
    transfer keeps the .part and the next call resumes it with a Range request.
    """
    from tqdm import tqdm

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        # one letter is a Windows drive (C:\data), not a scheme
        if len(scheme) > 1:
            raise UserError(f"{flag} {url}: only http(s) URLs or local paths")
        if not Path(url).exists():
            raise UserError(f"{flag} {url}: no such file or folder (and not an http(s) URL)")
        return Path(url)

    dest_dir = Path(dest_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        # torchrun: local rank 0 downloads on each machine; the other ranks wait for its finished
        # file and then reuse it (were rank 0 to fail, torchrun stops them)
        while not (dest_dir / download_name(url)).exists() or \
                (dest_dir / (download_name(url) + ".part")).exists():
            time.sleep(0.5)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--download-dir {dest_dir}: cannot create it ({e.strerror or e})")
    final = dest_dir / download_name(url)
    part = final.with_name(final.name + ".part")
    limit_msg = f"larger than --max-download-mb {max_bytes / 2 ** 20:g}; raise the limit if the file is right"

    def check_sum(path):
        got = file_sha256(path)
        return sha256 is None or got == sha256.lower(), got

    wants_html = final.suffix.lower() in (".html", ".htm")
    if final.exists() and not wants_html and looks_like_html(final):
        log(f"{flag} {url}: {final} is an HTML page, not data (an error or login page saved earlier); "
            "downloading again")
        final.unlink()
    if final.exists():
        ok, got = check_sum(final)
        if ok:
            log(f"{flag} {url}: using {final} (downloaded before)")
            return final
        log(f"{flag} {url}: {final} does not match --sha256 (got {got}); downloading again")
        final.unlink()

    def finish():
        ok, got = check_sum(part)
        if not ok:
            part.unlink()  # nothing half-right is left to be resumed or reused
            raise UserError(f"{flag} {url}: SHA-256 mismatch: expected {sha256.lower()}, got {got}; "
                            "the file was deleted (check the URL and --sha256)")
        with open(part, "rb+") as f:  # on disk before the rename makes it look finished
            os.fsync(f.fileno())
        os.replace(part, final)
        log(f"{flag} {url}: saved {final} ({final.stat().st_size:,} bytes, sha256 {got[:16]}...)")
        return final

    for _ in range(2):  # a second pass only after a resume the server could not honour (416)
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "lean-train"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = urllib.request.build_opener(HttpRedirectsOnly).open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                # nothing past our offset: the .part may already be whole. Trust it only if it can
                # be checked: the checksum, else the size the server states ("bytes */SIZE")
                size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
                if sha256 is not None or (size.isdigit() and int(size) == offset):
                    log(f"{flag} {url}: {part} is already complete")
                    return finish()
                log(f"{flag} {url}: the server refused to resume at byte {offset:,}; starting over")
                part.unlink()
                continue
            raise UserError(f"{flag} {url}: HTTP {e.code} {e.reason}")
        except RedirectRefused as e:
            raise UserError(f"{flag} {url}: redirected to {e}; only http(s) redirects are followed")
        except urllib.error.URLError as e:
            raise UserError(f"{flag} {url}: cannot connect ({e.reason})")
        except (OSError, http.client.HTTPException) as e:  # dropped before any header arrived
            raise UserError(f"{flag} {url}: download interrupted after {offset:,} bytes "
                            f"({type(e).__name__}: {e}); re-run the same command to resume")
        with resp:
            if offset and resp.status != 206:
                log(f"{flag} {url}: the server ignored the resume request; starting over")
                offset = 0  # a 200 is the whole file: append it to the .part and it is corrupt
            if not wants_html and resp.headers.get_content_type() == "text/html":
                # a login, error or "file moved" page with status 200: saved, it would be reused
                # as data on every re-run
                part.unlink(missing_ok=True)
                raise UserError(f"{flag} {url}: the server sent an HTML page, not a data file; check the "
                                "URL in a browser (it may need a login, or a direct download link)")
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                part.unlink(missing_ok=True)
                raise UserError(f"{flag} {url}: {total:,} bytes, {limit_msg}")
            done = offset
            bar = tqdm(total=total, initial=offset, desc=final.name[:30], unit="B", unit_scale=True, disable=not show_bar,
                       unit_divisor=1024, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
            try:
                with open(part, "ab" if offset else "wb") as f:
                    while True:
                        # read1: what has arrived, up to 64 KiB; read() would wait to fill its buffer
                        # and lose those bytes to a timeout instead of keeping them in the .part
                        block = resp.read1(1 << 16)
                        if not block:
                            break
                        if done + len(block) > max_bytes:
                            f.close()
                            part.unlink()
                            raise UserError(f"{flag} {url}: more than {max_bytes:,} bytes, {limit_msg}")
                        f.write(block)
                        done += len(block)
                        bar.update(len(block))
                    f.flush()
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise UserError(f"{flag} {url}: download interrupted after {done:,} bytes "
                                f"({type(e).__name__}: {e}); re-run the same command to resume")
            finally:
                bar.close()
        if total is not None and done < total:  # the server closed early without an error
            raise UserError(f"{flag} {url}: download interrupted after {done:,} of {total:,} bytes; "
                            "re-run the same command to resume")
        return finish()
    raise UserError(f"{flag} {url}: the server refused to resume twice; delete {part} and retry")


def fetch_data(args, flags, log=print, exts=None):
    """The trainer's data flags (dests in `flags`, in order; a list value such as --download-data
    counts each entry) with every http(s) URL fetched into --download-dir and replaced by the
    local file's path. Each --sha256 belongs to the data source in the same position, local
    files included; sources after the last --sha256 are not checked. With `exts`, a URL must end
    in one of them: the file type decides the reader, so that is known before any download.
    Used by every trainer, before it reads data."""
    sources = [(dest, i, v) for dest in flags
               for i, v in enumerate(getattr(args, dest) if isinstance(getattr(args, dest), list)
                                     else [getattr(args, dest)]) if v]
    sums = args.sha256 or []
    names = " / ".join("--" + d.replace("_", "-") for d in flags)
    if len(sums) > len(sources):
        raise UserError(f"--sha256 given {len(sums)} times for {len(sources)} data sources ({names}); each --sha256 "
                        "belongs to the data source in the same position")
    for s in sums:
        if len(s) != 64 or any(c not in "0123456789abcdefABCDEF" for c in s):
            raise UserError(f"--sha256 {s}: not a SHA-256 (64 hex digits)")
    for dest, _, v in sources:
        if exts and is_url(v) and Path(download_name(v)).suffix.lower() not in exts:
            raise UserError(f"--{dest.replace('_', '-')} {v}: the URL must end in {' or '.join(exts)} (the file "
                            "type decides how it is read)")
    for k, (dest, i, v) in enumerate(sources):
        flag, sha = "--" + dest.replace("_", "-"), sums[k] if k < len(sums) else None
        if sha is None and not is_url(v):
            continue  # a local path without a checksum: the trainer's own reader checks it
        path = fetch(v, args.download_dir, flag, sha256=sha, max_bytes=int(args.max_download_mb * 2 ** 20), log=log)
        if sha is not None and not is_url(v):  # a local path: fetch had nothing to check
            if not path.is_file():
                raise UserError(f"--sha256 {sha}: {flag} {v} is a folder; a checksum needs one file")
            if file_sha256(path) != sha.lower():
                raise UserError(f"{flag} {v}: SHA-256 mismatch: expected {sha.lower()}, got {file_sha256(path)}")
        if isinstance(getattr(args, dest), list):
            getattr(args, dest)[i] = str(path)
        else:
            setattr(args, dest, str(path))


MAX_REASONS = 5  # bad-row reasons kept per file; the count covers the rest
RECORD_EXTS = (".csv", ".tsv", ".jsonl", ".json")  # .json: JSON lines too (NeMo names its manifests so)


def read_records(path, flag, columns, optional=(), aliases=None, bad_rows="fail"):
    """The records of one CSV, TSV or JSONL file (by extension; UTF-8, Excel's BOM allowed).
    Used by train_gru.py, train_classifier.py, train_asr.py and train_sft.py.

    Returns (records, bad, reasons): records are dicts of `columns` (non-empty strings, stripped)
    and of whichever `optional` columns the row has; `aliases` maps other header names to a
    column (a manifest's "path" for "audio_filepath"). A row that is not a JSON object, has the
    wrong number of fields, or lacks a column or leaves it empty is bad. With bad_rows "fail"
    (the --bad-rows flag) the first one stops the run with its line number; with "skip" it is
    dropped and counted, and `reasons` keeps the first few ("line 7: empty 'text'"). A file
    that cannot be read at all is a UserError naming the flag.
    """
    p, aliases = Path(path), aliases or {}
    ext = p.suffix.lower()
    if ext not in RECORD_EXTS:
        raise UserError(f"{flag} {p}: unknown file type '{ext or p.name}'; use .csv, .tsv or .jsonl "
                        f"(columns {','.join(columns)})")
    if not p.is_file():
        raise UserError(f"{flag} {p}: {'a folder, not a file' if p.is_dir() else 'file not found'}")
    records, reasons, bad = [], [], 0

    def bad_row(line, why):
        nonlocal bad
        if bad_rows == "fail":
            raise UserError(f"{flag} {p}: line {line}: {why} (--bad-rows skip drops such rows)")
        bad += 1
        if len(reasons) < MAX_REASONS:
            reasons.append(f"line {line}: {why}")

    def take(line, row):
        row = {aliases.get(k, k): v for k, v in row.items()}
        for c in columns:
            if c not in row or row[c] is None:
                return bad_row(line, f"no '{c}'")
            if not isinstance(row[c], str):
                return bad_row(line, f"'{c}' is not text ({type(row[c]).__name__})")
            if not row[c].strip():
                return bad_row(line, f"empty '{c}'")
        records.append({c: row[c].strip() if isinstance(row[c], str) else row[c]
                        for c in (*columns, *optional) if c in row})

    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            if ext in (".jsonl", ".json"):
                for i, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad_row(i, f"not JSON ({e.msg})")
                        continue
                    if isinstance(obj, dict):
                        take(i, obj)
                    else:
                        bad_row(i, f"not a JSON object ({type(obj).__name__})")
            else:
                reader = csv.reader(f, delimiter="\t" if ext == ".tsv" else ",")
                header = [c.strip().lower() for c in next(reader, [])]
                if not header:
                    raise UserError(f"{flag} {p}: the file is empty; it needs a header line '{','.join(columns)}' "
                                    "and rows")
                found = {aliases.get(c, c) for c in header}
                missing = [c for c in columns if c not in found]
                if missing:
                    raise UserError(f"{flag} {p}: missing column(s) {', '.join(missing)}; the header line must "
                                    f"name {','.join(columns)} (found: {','.join(header)})")
                for row in reader:
                    if len(row) <= 1 and not "".join(row).strip():
                        continue  # a blank line (",," is a row of empty fields: bad)
                    # a short row may leave out trailing optional columns (an empty explanation)
                    if len(row) > len(header) or any(aliases.get(c, c) in columns for c in header[len(row):]):
                        bad_row(reader.line_num, f"{len(row)} fields, expected {len(header)} (quote texts that "
                                                 "contain the delimiter)")
                    else:
                        take(reader.line_num, dict(zip(header, row)))
    except UnicodeDecodeError:
        raise UserError(f"{flag} {p}: not UTF-8 text; save it as UTF-8")
    except csv.Error as e:
        raise UserError(f"{flag} {p}: malformed {ext[1:].upper()} ({e})")
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot read it ({e.strerror or e})")
    return records, bad, reasons


# -----------------------------------------------------------------------------
# device and precision

def setup_device(args, sources=None):
    """Pick device and autocast dtype. Returns (device, amp_dtype or None, scaler, reason).

    auto: bf16 on CUDA where supported, else fp16 with a GradScaler; fp32 on CPU for now, until
    measure_precision has timed the model's step (bf16 wins only on some CPUs and shapes). A precision that
    came from optimal_config.json (not typed) and does not fit the device falls back to auto.
    Used by open_run; benchmarks/bench_{gru,classifier,asr,lm}.py.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu "
                        "(or install a CUDA build of torch)")
    dev = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    prec = args.precision
    if sources and sources.get("precision") == "optimal_config.json" and (
            (dev.type == "cpu") != (prec == "fp32")):
        prec = "auto"  # e.g. a GPU machine's config with --device cpu
    if dev.type == "cpu":
        if prec == "fp16":
            raise UserError("--precision fp16 needs CUDA (no fp16 GradScaler on CPU); use bf16 or fp32")
        if prec == "auto":
            prec, why = "fp32", "CPU: fp32 until measure_precision times bf16"
        else:
            why = f"CPU: {prec} from {(sources or {}).get('precision', 'flag')}"
        if getattr(args, "gpu_memory", None):
            why += "; --gpu-memory has no effect on a CPU (--max-memory caps RAM)"
    else:
        # native bf16 only (Ampere+): emulated bf16 on a T4/GTX 16xx is slower than fp16
        try:
            bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.5 has no such argument and reports native support only
            bf16_ok = torch.cuda.is_bf16_supported()
        if prec == "auto":
            prec = "bf16" if bf16_ok else "fp16"
            why = "GPU supports bf16" if bf16_ok else "GPU lacks bf16: fp16 with GradScaler"
        elif prec == "bf16" and not bf16_ok:
            raise UserError("--precision bf16: this GPU does not support bf16; use fp16 or auto")
        else:
            why = f"{prec} from {(sources or {}).get('precision', 'flag')}"
        if torch.cuda.get_device_capability(dev)[0] >= 8:
            torch.backends.cuda.matmul.allow_tf32 = True  # Ampere+: fp32 matmuls via TF32 cores
            torch.backends.cudnn.allow_tf32 = True
            why += "; TF32 on (Ampere+)"
        if getattr(args, "gpu_memory", None):
            # the caching allocator raises its out-of-memory error at the cap, as a small card would:
            # the probe, the plan and train_step's halving see exactly what they would see there
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory * 2**30 / total), dev)
            why += f"; capped at {args.gpu_memory:g} of {total / 2**30:.0f} GB (--gpu-memory)"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
    if sources is not None:
        if args.precision == "auto":
            sources["precision"] = "auto"
        if args.device == "auto":
            sources["device"] = "auto"
    args.device = dev.type
    # bf16 has fp32's exponent range, so only fp16 needs loss scaling
    scaler = torch.amp.GradScaler(dev.type, enabled=(prec == "fp16"))
    args.precision = prec
    return dev, amp_dtype, scaler, why


def cpu_has_bf16():
    """True when /proc/cpuinfo lists bf16 matrix or vector units (AMX or AVX-512 BF16); False
    where it cannot tell (no /proc: macOS, Windows), which keeps such machines on fp32.
    Used by measure_precision; memory_optimizer.py (profile)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) is not None


def measure_precision(args, sources, device, model, step, log=print, resumed=None, margin=1.2):
    """--precision auto on a CPU, by measurement: bf16 autocast when the CPU has bf16 units and
    this model's own training step, timed at the run's micro-batch, is faster in bf16 by
    `margin`; else fp32. Matmul-bound shapes gain up to 2x; small ones lose (casts cost more than
    they save), so a rule of thumb cannot decide it. step(amp_dtype) runs one forward+backward
    (the batch probe's). The model's buffers and the RNG are restored: the timing changes nothing
    the run computes. resumed: the checkpoint's precision, reused as it is. --quick runs keep fp32.
    Returns (amp_dtype, why; None when nothing was decided here) and sets args.precision.
    Used by every trainer, after choose_batch_size."""
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if device.type != "cpu" or sources.get("precision") != "auto":
        return dtypes[args.precision], None  # typed, from a config, or CUDA's rule: nothing to measure
    if resumed:
        args.precision = resumed
        sources["precision"] = "checkpoint"
        return dtypes[resumed], f"CPU: {resumed} from the checkpoint being resumed"
    if args.quick:  # a smoke run of a tiny model: nothing to gain, and its numbers stay the same everywhere
        return None, "CPU: fp32 (--quick runs are not timed)"
    if not cpu_has_bf16():
        return None, "CPU: fp32 (no bf16 units listed in /proc/cpuinfo)"
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    best = {None: math.inf, torch.bfloat16: math.inf}
    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        for dt in best:
            step(dt)  # warm-up: the first call allocates and picks its kernels
        # alternating, best of 3 to 30 rounds (about 2 s in all): other load on the machine hits
        # both alike, and the best is what each precision can do. Fewer rounds were fooled on a
        # busy 2-core machine (a 4x128 GPT read 1.9x faster in bf16; it runs 0.75x)
        for _ in range(min(30, max(3, math.ceil(2.0 / max(1e-3, time.perf_counter() - t0))))):
            for dt in best:
                t0 = time.perf_counter()
                step(dt)
                best[dt] = min(best[dt], time.perf_counter() - t0)
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])  # e.g. BatchNorm statistics the timed steps moved
    fp32_ms, bf16_ms = 1e3 * best[None], 1e3 * best[torch.bfloat16]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # under torchrun every rank times its own step; all take rank 0's figures, so all agree
        figures = [(fp32_ms, bf16_ms)]
        torch.distributed.broadcast_object_list(figures, src=0)
        fp32_ms, bf16_ms = figures[0]
    args.precision = "bf16" if fp32_ms >= margin * bf16_ms else "fp32"
    why = (f"CPU: {args.precision} by measurement: this model's step {fp32_ms:.1f} ms in fp32, "
           f"{bf16_ms:.1f} ms in bf16 (bf16 needs {margin:.2f}x to win)")
    return (torch.bfloat16 if args.precision == "bf16" else None), why


def matmul_peak(device, dtype, seconds=2.0):
    """Best FLOP/s of square matmuls on this device (sizes 256..1024 on a CPU, 2048 and 4096 on
    a GPU), repeated over about `seconds`: the denominator of MFU. A one-second reading of one
    size swings 3x between runs on a busy machine (other load, clock boost); the best of many
    repeats at a few sizes is what the hardware can do, and it is stable.
    Used by memory_optimizer.py (profile, config: optimal_config.json keeps it); train_lm.py's
    device_peak (so train_sft.py too) when no config has it."""
    sizes = (2048, 4096) if device.type == "cuda" else (256, 512, 1024)
    mats = {n: (torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
            for n in sizes}
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for n, (a, b) in mats.items():
            reps = max(1, int(2e9 // (2 * n ** 3)))  # about 2 GFLOP per timing: long enough to time
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def autocast(device, amp_dtype):
    """torch.amp.autocast for amp_dtype; a no-op for fp32 (amp_dtype None).
    Used by train_step, probe_step; every trainer (evaluation)."""
    return torch.amp.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


# -----------------------------------------------------------------------------
# the step: autocast + exact gradient accumulation + unscale + clip + step, with OOM retry

def split_batch(batch, micro_bs):
    """Slice a dict of tensors (dim 0 = samples) into micro-batches of micro_bs samples.
    Used by train_step."""
    n = len(next(iter(batch.values())))
    return [{k: v[i:i + micro_bs] for k, v in batch.items()} for i in range(0, n, micro_bs)]


def is_oom(e):
    """True for CUDA out-of-memory and MemoryError, the errors a smaller batch can fix.
    Used by train_step, probe_batch_size; train_asr.py."""
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e))


def train_step(model, optimizer, scaler, batch, loss_fn, micro_bs, *, clip, device, amp_dtype, log=print,
               no_sync=None, norm=None):
    """One optimizer step over `batch` (the whole effective batch), in micro-batches.

    loss_fn(model, micro_batch) -> (loss_sum, n_items): the loss summed over the items it
    counts (tokens, frames, samples). Accumulation is exact: the gradient equals that of
    sum(loss)/sum(n) over the whole effective batch, whatever the micro-batch size, because we
    back-propagate loss_sum / estimate and, once every micro-batch is in, rescale the gradient
    by estimate / true_total (a padded micro-batch must not weigh like a full one).
    On CUDA OOM / MemoryError: free, halve the micro-batch, redo the step (same effective batch).
    no_sync: for DDP, the wrapped model's no_sync; every micro-batch but the last runs inside
    it, so gradients are all-reduced once per step, not once per micro-batch.
    norm: what to divide this rank's loss sum by, instead of its own item count. DDP averages the
    ranks' gradients, so with n_global items in the whole global batch, norm = n_global / world
    makes that average the gradient of sum(loss)/n_global, as one process would take, even when
    the ranks hold different numbers of tokens or frames (every rank counts n_global itself from
    the global batch's indices, without communication). The loss is then divided by norm before
    backward: a correction after DDP's all-reduce would differ from rank to rank.
    Returns (mean loss, items, micro_bs actually used).
    Used by every trainer.
    """
    while True:
        oom = unscaled = False
        try:
            micro = split_batch(batch, micro_bs)
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
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            return total_loss / max(1, total_n), total_n, micro_bs
        except Exception as e:
            if not is_oom(e) or micro_bs == 1:
                raise
            oom = True  # free below: inside `except` the traceback still pins the step's tensors
        if oom:
            optimizer.zero_grad(set_to_none=True)  # partial gradients of the failed try
            free_memory(device)
            if unscaled:
                # forget the failed try's unscale_/step, else the retry's unscale_ raises "already
                # been called": update(new_scale) clears that per-optimizer record, as every update()
                # does, while keeping the scale and its growth count (no inf check consumed)
                scaler.update(new_scale=scaler.get_scale())
            micro_bs = max(1, micro_bs // 2)
            log(f"out of memory: micro-batch halved to {micro_bs} (more accumulation, "
                "same effective batch); redoing the step")


def evaluate_halving(evaluate, bs, device, log=print):
    """evaluate(bs), with its batch halved after an out-of-memory error until it fits (down to 1):
    a validation pass needs no gradients, but a long batch's activations can still not fit.
    Every trainer's evaluation sums over items, so the batch size changes no figure (up to float
    rounding). Returns (evaluate's result, the bs that fitted): keep it for the next evaluation.
    Used by every trainer."""
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
# optimizer: AdamW, or AdamW with 8-bit moments (--optim adamw8bit)

def fused_adamw(device):
    """AdamW's fused kernel: one pass over each parameter instead of a dozen elementwise ops.
    On CUDA as nanoGPT does; on a CPU too since torch 2.4. Measured on CPU: train_lm.py at
    bench_lm.py's shape A (4 x 128) the optimizer step 3.6 -> 1.0 ms of a ~70 ms step, shape B
    (6 x 384) 24 -> 8 ms (docs/lm.md); train_asr.py minimal, batch 8 of espeak speech: 19.9 -> 6.8
    ms of a ~250 ms step (docs/asr.md). Older torch has no CPU kernel: the per-tensor loop.
    Used by train_lm.py (and train_sft.py through it) and train_asr.py."""
    if device.type == "cuda":
        return True
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def make_optimizer(params, args, *, lr, betas=(0.9, 0.999), weight_decay=0.0, fused=None):
    """torch.optim.AdamW, or AdamW8bit for --optim adamw8bit; params may be parameter groups.
    fused: AdamW's one-pass kernel (train_lm.py and train_asr.py pass fused_adamw(device); None:
    torch's default); AdamW8bit has none.
    Used by every trainer."""
    if args.optim == "adamw8bit":
        return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def dynamic_codes(signed):
    """The 255 values an 8-bit moment can take, on [-1, 1] (signed) or [0, 1], sorted.

    A linear 8-bit grid would round every entry under 1/255 of its block's largest to zero, and
    Adam's moments span many decades. So, as in Dettmers et al.'s 8-bit optimizers (arXiv
    2110.02861), the codes are split by decade, 10^0 down to 10^-6, with evenly spaced fractions
    inside each, and more of them in the larger decades: 64, 32, ..., 1 per sign, plus zero
    (unsigned: twice as many per decade). Relative rounding error is about 1 % near the block's
    largest value, and an entry a million times smaller still keeps its decade.
    Used by AdamW8bit, which builds its code_table from them."""
    mags = torch.cat([torch.linspace(0.1, 1.0, (1 if signed else 2) * 2 ** (6 - k) + 1, dtype=torch.float64)[1:]
                      * 10.0 ** -k for k in range(7)])
    codes = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]) if signed else \
        torch.cat([torch.zeros(1, dtype=torch.float64), mags])
    return codes.sort().values.float()


def code_table(codes):
    """For each of the 65,536 fp16 bit patterns, the index of the code nearest its value: a table
    that quantize reads instead of searching the codes for every value (torch.bucketize took 100
    ns a value on a CPU, 6x the rest of quantize together). fp16 keeps 11 significant bits from
    1 down to 6e-5, and the codes are 0.5 % apart at the closest: rounding to fp16 first moves
    a value at most 0.05 %, so a code is picked over the nearest only that close to a midpoint.
    Used by AdamW8bit."""
    p = torch.arange(65536, dtype=torch.int32)
    values = torch.where(p >= 32768, p - 65536, p).to(torch.int16).view(torch.float16).float()
    values = torch.nan_to_num(values, nan=0.0).clamp(float(codes[0]), 1.0)  # NaN, inf: never asked
    return torch.bucketize(values, (codes[1:] + codes[:-1]) / 2).to(torch.uint8)  # midpoints: the boundaries


def quantize(x, table, block):
    """Block-wise 8-bit quantization of a tensor: each block of `block` values is divided by its
    largest magnitude (its absmax, kept in fp32), then rounded to the nearest code through
    `table` (code_table) by its fp16 bit pattern.
    Returns (uint8 indices, padded to whole blocks; fp32 absmax per block).
    Used by AdamW8bit; tests/test_memory.py (against a brute-force nearest code)."""
    flat = x.detach().float().reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)  # (blocks, block)
    absmax = flat.abs().amax(dim=1)
    scaled = flat / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]
    bits = scaled.to(torch.float16).view(torch.int16).int().bitwise_and_(0xFFFF)  # 0..65535
    return table[bits].view(-1), absmax


def dequantize(idx, absmax, codes, like):
    """The inverse of quantize, back to fp32 in the shape of `like`. Used by AdamW8bit."""
    blocks = codes[idx.int()].view(absmax.numel(), -1) * absmax[:, None]  # int32: uint8 would be a mask
    return blocks.view(-1)[:like.numel()].view_as(like)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction, as torch.optim.AdamW) whose two moments are
    stored in 8 bits: 2 bytes per weight plus 8 per block of 2,048, against AdamW's 8 bytes per
    weight. Each step dequantizes a tensor's moments to fp32, updates them and the weight exactly
    as AdamW would, and quantizes them again; only the stored moments carry rounding.
    The second moment is stored as its square root (the gradient's running RMS): that spans half
    the decades, so small entries do not round to zero under a large neighbour, which would
    divide their update by eps alone. Tensors under 4,096 values (biases, norms, small heads)
    keep fp32 moments: their state is small and they are the most sensitive.
    The state is plain tensors, saved and loaded with the checkpoint, and every operation is
    deterministic: a resumed run takes the same steps.
    Used through make_optimizer (--optim adamw8bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, block=2048, min_size=4096):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.block, self.min_size = block, min_size
        self.codes = {signed: dynamic_codes(signed) for signed in (True, False)}
        self.tables = {signed: code_table(self.codes[signed]) for signed in (True, False)}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for st in self.state.values():  # torch casts every state tensor to the weight's dtype: undo it
            for k in ("m_idx", "r_idx"):
                if k in st:
                    st[k] = st[k].to(torch.uint8)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, st = p.grad.float(), self.state[p]
                small = p.numel() < self.min_size
                if not st:
                    st["step"] = 0
                    if small:
                        st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                    else:
                        n = math.ceil(p.numel() / self.block)
                        for k in ("m", "r"):  # absmax 0: every entry dequantizes to 0
                            st[f"{k}_idx"] = torch.zeros(n * self.block, dtype=torch.uint8, device=p.device)
                            st[f"{k}_absmax"] = torch.zeros(n, device=p.device)
                st["step"] += 1
                codes_m, codes_r = self.codes[True].to(p.device), self.codes[False].to(p.device)
                table_m, table_r = self.tables[True].to(p.device), self.tables[False].to(p.device)
                if small:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                else:
                    m = dequantize(st["m_idx"], st["m_absmax"], codes_m, g)
                    v = dequantize(st["r_idx"], st["r_absmax"], codes_r, g).square_()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                t = st["step"]
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-group["lr"] / (1 - b1 ** t))
                if not small:
                    st["m_idx"], st["m_absmax"] = quantize(m, table_m, self.block)
                    st["r_idx"], st["r_absmax"] = quantize(v.sqrt_(), table_r, self.block)
        return loss

    def planned_state_bytes(self, p):
        """The state p will hold once it has taken a step. Used by optimizer_state_bytes."""
        if p.numel() < self.min_size:
            return 2 * 4 * p.numel()
        n = math.ceil(p.numel() / self.block)
        return 2 * (n * self.block + 4 * n)


def optimizer_state_bytes(optimizer, planned=False):
    """Bytes of the optimizer's state tensors; planned=True: what they will be once every weight
    has taken a step (before the first step, AdamW's lazily made state does not exist yet).
    Used by memory_plan, TensorPeak; every trainer (summary.json's optimizer_state_mb)."""
    if not planned:
        return tensor_bytes([list(st.values()) for st in optimizer.state.values()])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if isinstance(optimizer, AdamW8bit):
        return sum(optimizer.planned_state_bytes(p) for p in params)
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)  # exp_avg, exp_avg_sq, step


# -----------------------------------------------------------------------------
# memory plan: what a step will hold, before the first one; and what it held

def activation_bytes(model, loss_fn, batch, device, amp_dtype):
    """Bytes that a forward of this micro-batch keeps for backward: every tensor autograd saves
    (counted once per storage; the weights themselves excluded, bf16 copies of them included).
    These live from the forward until backward frees them, the part of a step's memory that
    grows with the batch. Measured on the batch's first item and its first two, then extended to
    the whole batch: activations are affine in the batch size (a part per item, plus a part per
    step such as bf16 copies of the weights). A forward of the whole micro-batch would hold all
    of them once more before training starts, and the heap keeps that memory: +29 MB of peak RSS
    on train_lm.py at nanoGPT's CPU shape, whose whole run takes 365 MB in nanoGPT.
    Nothing is trained: the graphs are dropped without a backward; buffers and the RNG are restored.
    Used by memory_plan's callers: every trainer."""
    n = len(next(iter(batch.values())))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def saved_bytes(m):
        part = {k: v[:m].clone() for k, v in batch.items()}  # a clone: a view would count the whole batch
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                saved[st.data_ptr()] = st.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, amp_dtype):
            loss_sum, _ = loss_fn(model, part)
        del loss_sum  # frees the graph and what it saved
        return sum(saved.values())

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        one, two = saved_bytes(1), saved_bytes(min(2, n))
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(buffers[k])  # e.g. BatchNorm statistics these forwards moved
    return one + (two - one) * (n - 1)


def memory_plan(model, optimizer, activations, micro_bs, world=1, log=print, worst="the longest items"):
    """The memory a training step will need at its peak, from the model and the optimizer as
    built and one forward's measured activations: weights (with buffers) + gradients (trainable
    weights) + optimizer state (as it will be after the first step) + the activations of one
    micro-batch (one is alive at a time: accumulation runs them one after another) and, under
    DDP, its gradient buckets (a second copy of the gradients). Logs one line and returns the
    parts and their total in MB, for summary.json's memory_plan_mb.
    Used by every trainer, before the first step."""
    params = list(model.parameters())
    parts = {"weights": tensor_bytes(params) + tensor_bytes(list(model.buffers())),
             "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
             "optimizer": optimizer_state_bytes(optimizer, planned=True),
             "activations": activations}
    if world > 1:
        parts["ddp_buckets"] = parts["gradients"]
    plan = {k: round(v / 2**20, 1) for k, v in parts.items()}
    plan["total"] = round(sum(parts.values()) / 2**20, 1)
    name = "AdamW 8-bit" if isinstance(optimizer, AdamW8bit) else "AdamW"
    log(f"memory plan: weights {plan['weights']} MB + gradients {plan['gradients']} + {name} state "
        f"{plan['optimizer']} + activations {plan['activations']} (measured on 1 and 2 x {worst}, for {micro_bs})"
        + (f" + DDP buckets {plan['ddp_buckets']}" if world > 1 else "") + f" = {plan['total']} MB")
    return plan


def plan_only(out, status, log=print):
    """--plan: the plan is printed; stop before the first step, with nothing trained or saved.
    Returns the exit code. Used by every trainer."""
    update_status(out, status, state="planned")
    log("memory plan only (--plan): nothing trained or saved")
    return 0


def memory_figures(plan, peak, optimizer, args):
    """summary.json's memory fields: the plan, the measured peak beside it, and the optimizer
    state as it is at the end. Used by every trainer."""
    return {"optim": args.optim, "memory_plan_mb": plan, "peak_tensor_mb": peak.mb,
            "optimizer_state_mb": round(optimizer_state_bytes(optimizer) / 2**20, 2)}


@contextlib.contextmanager
def quiet_fd2():
    """Silence file descriptor 2 for a moment: torch's profiler prints two lines from C++ at each
    start and stop, which no Python setting turns off. Used by TensorPeak."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class TensorPeak:
    """The peak bytes of live tensors during one training step, the figure the memory plan
    predicts: what was held when the step began (weights, buffers, gradients, optimizer state)
    + the most the step allocated on top. CUDA: torch.cuda.max_memory_allocated less what was
    allocated at the start (which also holds cuBLAS's workspace, not a tensor). CPU: torch's
    profiler records every allocation and free of the step (profile_memory); their running sum
    in time order peaks where max_memory_allocated would. The profiler slows the measured steps;
    the others run as they always do. A step is measured when its batch is the largest yet (size: its padded
    elements), once the optimizer has its state (AdamW makes it in the first step): a handful of
    steps in a whole run, as a new largest comes ever more rarely, and the largest of them is the
    run's peak. `mb` is what the largest held (None under torchrun on a CPU: not measured). On a
    CPU only the largest step's records are kept, and read when `mb` is asked for: reading them
    costs ~10x the step itself, recording them ~2x.
        peak = TensorPeak(device, model, optimizer)
        with peak.measure(batch["x"].numel()): ...one train_step...
        summary["peak_tensor_mb"] = peak.mb
    Used by every trainer."""

    def __init__(self, device, model, optimizer):
        self.device, self.model, self.optimizer, self.largest = device, model, optimizer, 0
        self.measured = self.records = None  # MB measured so far; (held, profile) of the largest CPU step, unread

    @property
    def mb(self):
        if self.records:
            held, prof = self.records
            now = peak = 0
            for e in sorted(prof.function_events, key=lambda e: e.time_range.start):
                now += e.self_cpu_memory_usage  # + what the op allocated, - what it freed
                peak = max(peak, now)
            self.measured, self.records = max(self.measured or 0, round((held + peak) / 2**20, 1)), None
        return self.measured

    @contextlib.contextmanager
    def measure(self, size):
        # under torchrun on a CPU, not at all: quiet_fd2 would also silence what gloo prints from C++
        # mid-step, and the ranks' batches (their slices) differ, so each would measure other steps
        ddp_cpu = self.device.type == "cpu" and dist.is_available() and dist.is_initialized()
        if not self.optimizer.state or size <= self.largest or ddp_cpu:
            yield
            return
        self.largest = size
        params = list(self.model.parameters())
        held = (tensor_bytes(params) + tensor_bytes(list(self.model.buffers()))
                + tensor_bytes([p.grad for p in params if p.grad is not None])
                + optimizer_state_bytes(self.optimizer))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            self.measured = max(self.measured or 0,
                                round((held + torch.cuda.max_memory_allocated(self.device) - start) / 2**20, 1))
            return
        with quiet_fd2(), torch.autograd.profiler.profile(use_kineto=False, profile_memory=True) as prof:
            yield
        self.records = held, prof  # a smaller step's records are dropped unread


# -----------------------------------------------------------------------------
# batch size

def table_batch_size(device, quick, free_gpu_gb=None, ram_gb=None):
    """Starting micro-batch before the probe. CPU: the seeds' RAM table; CUDA: free GPU memory.

    Returns (batch size, reason).
    Used by choose_batch_size and memory_optimizer.py config (so both give the same numbers).
    """
    if device == "cuda":
        gb = free_gpu_gb if free_gpu_gb is not None else torch.cuda.mem_get_info()[0] / 2**30
        bs = 64 if gb >= 16 else 32 if gb >= 8 else 16 if gb >= 4 else 8
        return (bs if quick else bs // 2), f"{gb:.1f} GB free on the GPU"
    gb = ram_gb if ram_gb is not None else psutil.virtual_memory().total / 2**30
    if gb < 8:
        bs = 4 if quick else 2
    elif gb <= 16:
        bs = 8 if quick else 4
    else:
        bs = 16 if quick else 8
    return bs, f"{gb:.0f} GB RAM ({'quick' if quick else 'standard'} column of the RAM table)"


def choose_batch_size(args, sources, device, probe, log=print, resumed=None):
    """Resolve --batch-size/--grad-accum into (micro_bs, accum) and say why.

    probe(bs) runs one real forward+backward at batch bs and raises MemoryError/CUDA OOM or
    returns the peak bytes it needed. `resumed` = (micro, accum) from a checkpoint: reused as
    is, so a resumed run does the same arithmetic as the run it continues.
    Used by every trainer.
    """
    E = args.effective_batch
    if resumed:
        micro, accum = resumed
        sources["batch_size"] = sources["grad_accum"] = "checkpoint"
        why = "from the checkpoint being resumed"
    elif args.batch_size == "auto":
        start, why = table_batch_size(device.type, args.quick, free_gpu_gb=free_gpu_gb(device, args.gpu_memory))
        start = min(start, E)  # a micro-batch never exceeds the effective batch
        micro = probe_batch_size(probe, start, device, args, log)
        accum = (args.grad_accum * start // micro if args.grad_accum != "auto"
                 else max(1, math.ceil(E / micro)))
        why = f"start {start} from {why}; probe {'kept it' if micro == start else f'halved to {micro}'}"
        sources["batch_size"] = "auto"
        if args.grad_accum == "auto":
            sources["grad_accum"] = "auto"
        if args.resource_efficient and micro > 1:
            micro, accum = micro // 2, accum * 2
            why += "; halved by --resource-efficient"
    else:
        micro = args.batch_size
        accum = args.grad_accum if args.grad_accum != "auto" else max(1, math.ceil(E / micro))
        why = f"--batch-size from {sources['batch_size']}"
        if args.grad_accum == "auto":
            sources["grad_accum"] = "auto"
        # a batch the user typed, or one a mode set outright (train_lm.py's table), is not halved
        if args.resource_efficient and micro > 1 and sources["batch_size"] not in ("flag", "resource-efficient"):
            micro, accum = micro // 2, accum * 2
            why += "; halved by --resource-efficient"
    args.batch_size, args.grad_accum = micro, accum
    return micro, accum, why


def probe_batch_size(probe, start, device, args, log=print):
    """Halve `start` until one forward+backward fits under the memory thresholds.
    Used by choose_batch_size."""
    bs = start
    while True:
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                need = probe(bs)  # RNG forked: the probe must not change the run's random stream
            over = "the memory threshold"
            if device.type == "cuda":
                total = torch.cuda.get_device_properties(device).total_memory
                if args.gpu_memory:
                    total, over = min(total, args.gpu_memory * 2**30), f"--gpu-memory {args.gpu_memory:g}"
                limit = total * args.gpu_threshold / 100
            else:
                vm = psutil.virtual_memory()
                # what is already used by others + what this step needs must stay under the threshold
                limit = vm.total * args.ram_threshold / 100 - (vm.total - vm.available)
                if args.max_memory:  # this process as it is now + the step must stay under the cap
                    cap = args.max_memory * 2**30 - psutil.Process().memory_info().rss
                    if cap < limit:
                        limit, over = cap, f"--max-memory {args.max_memory:g} (this process holds " \
                                           f"{psutil.Process().memory_info().rss / 2**30:.2f} GB before it)"
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
    """One forward+backward for choose_batch_size; returns the memory it needed in bytes.

    On CPU, torch has no allocator statistics, so we read the process RSS with the activations
    alive (after forward) and count backward as needing about as much again. Gradients and the
    optimizer's state are added from the parameter count (AdamW: two moments per weight).
    Used by every trainer, in the probe it passes to choose_batch_size.
    """
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
    # AdamW's two moments do not exist yet (and on CPU neither do the gradients): count them
    state = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base + 2 * state
    return 2 * max(0, rss1 - rss0) + 3 * state


class StepBatches(torch.utils.data.Dataset):
    """Item i = the batch of optimizer step i, fn(step=i, **kw), for a DataLoader with --workers
    processes that build batches ahead of the loop. A module function plus plain data, so it
    pickles for the spawn start method (Windows, macOS, and Python 3.14's forkserver default): a
    lambda or a local function would not.
    Used by train_lm.py, train_sft.py."""

    def __init__(self, fn, **kw):
        self.fn, self.kw = fn, kw

    def __getitem__(self, i):
        return self.fn(step=i, **self.kw)


def quiet_worker(_):
    """Loader workers ignore Ctrl-C: the main process handles it (it saves, then ends them).
    Used by train_classifier.py, train_lm.py, train_sft.py (worker_init_fn of their DataLoader)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# memory

def free_gpu_gb(device, cap_gb=None):
    """Free memory on a CUDA device in GB (None on CPU); under a --gpu-memory cap, what is left of
    the cap at most.
    Used by choose_batch_size; train_gru.py, train_asr.py."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if cap_gb:
        free = min(free, cap_gb * 2**30 - torch.cuda.memory_reserved(device))
    return free / 2**30


def memory_snapshot(device):
    """RAM and GPU memory now (process RSS, system %, GPU allocated and % of the card).
    Used by check_memory; every trainer."""
    vm = psutil.virtual_memory()
    snap = {"ram_mb": round(psutil.Process().memory_info().rss / 2**20, 1), "ram_pct": vm.percent,
            "gpu_mb": None, "gpu_pct": None}
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        reserved = torch.cuda.memory_reserved(device)
        snap["gpu_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
        snap["gpu_pct"] = round(100 * reserved / total, 1)
    return snap


def peak_memory_mb(device):
    """Peak memory of this run: GPU max allocated on CUDA, else the process's peak RSS.
    Used by every trainer."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
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
    """Linux (glibc): send every allocation >= threshold to mmap, so it goes back to the OS the
    moment it is freed. By default glibc raises that threshold after each large free (up to
    32 MB), so activations then come from the heap, and with micro-batches of varying length
    the freed gaps rarely fit the next request: the process's RSS keeps growing. Measured on
    `train_sft.py`: this setting alone took peak RSS from 1,338 to 485 MB at 0.70x the
    speed (docs/sft.md, table 4).
    Also what MALLOC_MMAP_THRESHOLD_=1048576 in the environment does. Returns True if set.
    Used by resolve_settings (--resource-efficient); benchmarks/bench_lm.py."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        return ctypes.CDLL(None).mallopt(-3, threshold) == 1  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc (musl has no mallopt symbol)
        return False


def free_memory(device):
    """gc (Python cycles holding tensors) + the CUDA caching allocator's unused blocks.
    Used by train_step, probe_batch_size, check_memory; memory_optimizer.py optimize."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_memory(watch, device, log=print):
    """Every `watch['every']` seconds compares RAM/GPU use to the thresholds
    and frees caches when over. watch = {'every', 'ram', 'gpu', 'last'} (mutated).
    Used by every trainer, every step."""
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
    """Seed Python, numpy and torch (every CUDA device too). Used by open_run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state():
    """All RNG states as weights_only-loadable data (numpy's array becomes a tensor).
    Used by training_state."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)),
                                                     pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """The inverse of rng_state. Used by restore_training_state."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(model, optimizer, scheduler, scaler, **plain):
    """What a checkpoint holds: the state_dicts, every RNG state, and the trainer's plain data
    (step, position in the epoch, best metric, ...).
    Used by every trainer (its result goes to save_checkpoint)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(), **plain}


def restore_training_state(state, model, optimizer, scheduler, scaler):
    """The inverse of training_state, for a resume: after it, the run continues as if never stopped.
    Returns (wall_s, train_s, samples) of the run's earlier segments, zeros without a state.
    Used by every trainer."""
    if not state:
        return 0.0, 0.0, 0
    had, want = state.get("args", {}).get("optim", "adamw"), "adamw8bit" if isinstance(optimizer, AdamW8bit) else "adamw"
    if had != want:
        raise UserError(f"the checkpoint being resumed was trained with --optim {had}; resume with --optim {had}, "
                        "or start over with --no-resume or a new --out")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state.get("wall_s", 0.0), state.get("train_s", 0.0), state.get("samples", 0)


def _atomic_torch_save(obj, path, also=None):
    """torch.save to a temp file, fsync, os.replace: never half a checkpoint. Then its SHA-256
    beside it (<name>.sha256, also atomic), which load_checkpoint checks before trusting it.
    also: a second path that gets a copy (best.pt) before `path` itself appears. A kill before
    `path` exists leaves the run to resume from the checkpoint before, so the replayed steps
    write both again: best.pt is never left older than the step that made it.
    A full disk is a UserError that says how much space the save needs; the partial file is
    deleted (it would only hold the space a retry needs) and earlier checkpoints stay intact.
    Used by save_checkpoint."""
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
        if not disk_full(e):
            raise
        need, free = tensor_bytes(obj) / 2**20, shutil.disk_usage(path.parent).free / 2**20
        raise UserError(f"--out {path.parent.parent}: the disk is full: {path.name} needs about {need:,.0f} MB in "
                        f"{path.parent} ({free:,.0f} MB free); free some space and re-run the same command to "
                        "resume from the last checkpoint") from None


def disk_full(e):
    """True when e, or what it was raised from, is "no space left" (torch.save reports it as a
    RuntimeError whose context is the OSError). Used by _atomic_torch_save."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def tensor_bytes(obj):
    """Bytes of every tensor in a nest of dicts/lists/tuples: about a checkpoint's size.
    Used by _atomic_torch_save."""
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
    check (that file is passed over), no checksum is trusted (files from before checksums).
    Used by _atomic_torch_save."""
    side = path.with_name(path.name + ".sha256")
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text(file_sha256(path) + "\n")
    os.replace(tmp, side)


def _ckpt_step(path):
    """The step N of ckpt_stepN.pt, for numeric sorting.
    Used by save_checkpoint, find_checkpoint."""
    return int(path.stem.split("step")[1])


def save_checkpoint(out, step, state, keep, protect=None, best=False, log=print):
    """Write <out>/checkpoints/ckpt_step{N:08d}.pt atomically, keep the newest `keep`, never
    delete `protect` (the file this run resumed from); best=True also writes best.pt, first.
    `state` is a dict of state_dicts and plain data -- never a module or a function.
    Warns when the disk has less room than the last checkpoint took, while it still fits.
    Used by every trainer."""
    d = Path(out) / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    ckpts = sorted(d.glob(CKPT_GLOB), key=_ckpt_step)
    if ckpts:
        need, free = ckpts[-1].stat().st_size * (2 if best else 1), shutil.disk_usage(d).free
        if free < 3 * need:
            log(f"warning: {free / 2**20:,.0f} MB free in {d}, and a checkpoint takes {need / 2**20:,.0f} MB; "
                "free some space (or lower --keep) before the disk fills")
    path = d / f"ckpt_step{step:08d}.pt"
    _atomic_torch_save(state, path, also=d / "best.pt" if best else None)
    for old in sorted(d.glob(CKPT_GLOB), key=_ckpt_step)[:-keep]:
        if protect is None or old.resolve() != Path(protect).resolve():
            old.unlink()
            old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


class ChecksumMismatch(Exception):
    """A checkpoint whose bytes are not the ones saved (<name>.sha256 disagrees)."""


def load_checkpoint(path):
    """Load a checkpoint without running code from it and without trusting bytes it has not
    verified: the file's SHA-256 must match <name>.sha256 when there is one (a flipped byte
    inside a tensor passes the zip format's own checks), and weights_only=True refuses pickled
    callables/classes, so a tampered file raises instead of executing.
    Used by find_checkpoint, load_run_model; train_classifier.py (best.pt)."""
    side = Path(path).with_name(Path(path).name + ".sha256")
    if side.is_file():
        want, got = side.read_text().strip(), file_sha256(path)
        if got != want:
            raise ChecksumMismatch(f"SHA-256 {got[:16]}... is not the {want[:16]}... saved in {side.name}")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run_model(run, flag, trainer, key, resume=None):
    """The model a run folder serves: --resume PATH, else its best.pt, else its newest loadable
    checkpoint. Returns (state, path); no checkpoint, or one made by another trainer (it lacks
    `key`, the entry this trainer's model is built from), is a UserError naming `flag`.
    Used by every path that serves a model: train_gru.py --suggest, train_classifier.py
    --predict, train_asr.py --transcribe, train_lm.py sample, train_sft.py ask and --init-from."""
    run = Path(run)
    best = run / "checkpoints" / "best.pt"
    if resume is None and best.is_file():
        try:
            state, path = load_checkpoint(best), best
        except Exception as e:  # a damaged best.pt: say so, and serve the newest step checkpoint
            print(f"warning: {best} is unreadable ({type(e).__name__}); using the newest checkpoint",
                  file=sys.stderr)
            state, path = find_checkpoint(run, argparse.Namespace(resume=None, no_resume=False, trainer=None),
                                          lambda m: print(m, file=sys.stderr))
    else:
        state, path = find_checkpoint(run, argparse.Namespace(resume=resume, no_resume=False, trainer=trainer if resume else None),
                                      lambda m: print(m, file=sys.stderr))
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
    """The trainer name a checkpoint's args record (None for a file without one).
    Used by load_run_model, find_checkpoint."""
    args = state.get("args") if isinstance(state, dict) else None
    return args.get("trainer") if isinstance(args, dict) else None


def check_trainer(found, trainer, where):
    """UserError when `found` (the trainer that wrote a run folder or checkpoint) is another
    trainer's: its model would not fit this one's (a KeyError deep inside, before). The LM and
    SFT share one model, so each reads the other's checkpoints.
    trainer=None checks nothing (load_run_model checks, naming its own flag).
    Used by load_run_model, find_checkpoint, prepare_run_dir."""
    if trainer is None or found in (None, trainer) or {found, trainer} <= {"lm", "sft"}:
        return
    if found not in TRAINERS:
        raise UserError(f"{where}: written by an unknown trainer {found!r}; pick another")
    raise UserError(f"{where}: made by {TRAINERS[found]}, not {TRAINERS[trainer]}; pick a "
                    f"{TRAINERS[trainer]} run (or another --out for a new one)")


def find_checkpoint(out, args, log=print):
    """The checkpoint to resume from: --resume PATH, else the newest loadable one in <out>.
    A truncated or corrupt newest file gives a warning and the previous one is used.
    Returns (state, path) or (None, None).
    Used by open_run; every trainer."""
    if args.resume:
        p = Path(args.resume)
        if not p.is_file():
            raise UserError(f"--resume {p}: file not found")
        try:
            state = load_checkpoint(p)
        except Exception as e:
            # torch's own message advises weights_only=False, i.e. running the file's code: not here
            first = str(e).splitlines()[0][:200] if str(e).strip() else ""
            why = "it holds pickled code, which is never run" if "weights_only" in str(e) else first
            raise UserError(f"--resume {p}: not a loadable checkpoint ({type(e).__name__}: {why})")
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
# run folder: args.json, status.json, metrics.jsonl, train.log, summary.json, plots

def open_run(args, sources):
    """Once a trainer's flags and data are checked, before anything is written:
    the run folder (default runs/<trainer>-<time>, checked writable), the seed, the device and
    precision (setup_device), and the checkpoint to resume. Returns (out, (device, amp_dtype,
    scaler, why), state, resumed_from, notes): notes are lines for the log, once start_run opens it.
    Used by every trainer."""
    if args.resume and args.no_resume:
        raise UserError(f"--resume {args.resume} --no-resume: pick one (resume from that file, or start over)")
    out = Path(args.out) if args.out else default_out(args.trainer)
    args.out = str(out)
    check_out_writable(out)
    check_trainer(read_status(out).get("trainer"), args.trainer, f"--out {out}")
    seed_everything(args.seed)
    device = setup_device(args, sources)
    notes = []
    state, resumed_from = find_checkpoint(out, args, notes.append)
    return out, device, state, resumed_from, notes


def default_out(trainer):
    """runs/<trainer>-<timestamp>. Used by open_run."""
    return Path("runs") / f"{trainer}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def check_out_writable(out):
    """Fail early (exit 2) if --out cannot be a run folder, before anything is written.
    Used by open_run; train_lm.py (prepare, the built-in corpus), memory_optimizer.py start."""
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
    moved to *.old-<time> rather than deleted or overwritten.
    Used by start_run."""
    out = Path(out)
    if (out / "status.json").exists():
        st = read_status(out)
        # a copy of a live run folder names the original as its "out": that trainer is not training this one
        same = isinstance(st.get("out"), str) and Path(st["out"]).resolve() == out.resolve()
        if same and st.get("pid") != os.getpid() and st.get("state") in ("starting", "running") and \
                process_is_trainer(st):
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


def read_status(out):
    """<out>/status.json as a dict; {} when there is none or it is unreadable (an unreadable one
    proves no live trainer, and start_run writes a new one).
    Used by open_run, prepare_run_dir, list_runs; memory_optimizer.py."""
    try:
        st = json.loads((Path(out) / "status.json").read_text() or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return st if isinstance(st, dict) else {}


def write_json_atomic(path, obj):
    """Write JSON via a temp file and os.replace, so readers never see half a file.
    Used by write_args, update_status, write_summary; train_lm.py's device_peak (so train_sft.py
    too), memory_optimizer.py."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    # no fsync: status.json is rewritten every log interval; os.replace alone keeps it whole
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def write_args(out, args, sources, chosen):
    """args.json: every resolved setting, where it came from, and what auto-tuning chose.
    Used by every trainer."""
    settings = {k: {"value": v, "source": sources.get(k, "default")} for k, v in sorted(vars(args).items())}
    write_json_atomic(Path(out) / "args.json", {"settings": settings, "chosen": chosen,
                                                 "argv": sys.argv, "python": sys.executable})


def update_status(out, status, **changes):
    """Merge `changes` into the status dict and write status.json atomically (readers never
    see half a file).
    Used by every trainer, at every log interval and state change."""
    status.update(changes, updated=time.time())
    write_json_atomic(Path(out) / "status.json", status)


def start_run(out, args, trainer, metric_name, notes=()):
    """Once all the trainer's checks have passed (nothing is written before):
    claim the run folder, open train.log (and log `notes`), write the first status.json,
    install the stop handlers. Returns (log, status, stop).
    Used by every trainer."""
    moved = prepare_run_dir(out, args.no_resume)
    log = make_logger(out)
    for note in [*notes, *([f"--no-resume: earlier files kept as {', '.join(moved)}"] if moved else [])]:
        log(note)
    status = new_status(trainer, out, metric_name)
    update_status(out, status)
    return log, status, install_stop_handlers()


@contextlib.contextmanager
def recording_failures(out, status):
    """Around a trainer's training: if it raises, status.json says so (`failed` with the error,
    or `stopped` after a second Ctrl-C) before the exception goes on.
    Used by every trainer."""
    try:
        yield
    except KeyboardInterrupt:
        update_status(out, status, state="stopped")
        raise
    except Exception as e:
        try:
            update_status(out, status, state="failed", error=str(e) if isinstance(e, UserError) else
                          f"{type(e).__name__}: {e}")
        except OSError:  # a full disk may refuse status.json too: the error itself still reaches the user
            pass
        raise


def memory_watch(args):
    """The state check_memory keeps between calls, from the memory flags.
    Used by every trainer."""
    return {"every": args.mem_check_every, "ram": args.ram_threshold, "gpu": args.gpu_threshold,
            "swap": args.swap_threshold,
            "last": time.monotonic()}


def progress_bar(total, initial):
    """The training bar: redraws often on a terminal, every 30 s into a log file.
    Used by every trainer."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1 if sys.stderr.isatty() else 30)


def append_metrics(out, record):
    """One JSON record per line to <out>/metrics.jsonl. Used by every trainer."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(out, step):
    """On resume from step N, drop records a killed run wrote after its checkpoint at N:
    they will be written again, identically, by the resumed run. A line a kill cut in half
    is dropped too. The rewrite is atomic: a kill during it keeps the old file.
    Used by every trainer."""
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


def read_metrics(out):
    """The records of <out>/metrics.jsonl ([] without one).
    Used by plot_progress; train_classifier.py."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def make_logger(out):
    """log(msg): print above the tqdm bar and append to <out>/train.log with a timestamp.
    Used by start_run."""
    path = Path(out) / "train.log"

    def log(msg):
        from tqdm import tqdm
        tqdm.write(str(msg))
        with open(path, "a") as f:
            f.write(f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")
    return log


def write_summary(out, **fields):
    """<out>/summary.json: the run's final numbers. Used by every trainer."""
    write_json_atomic(Path(out) / "summary.json", fields)


def plot_progress(out, metric):
    """plots/training_progress.png (train loss and the main validation metric vs step), when
    matplotlib is installed. Returns the path or None.
    Used by train_gru.py, train_asr.py, train_lm.py, train_sft.py."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r[metric]) for r in recs if metric in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, pts, name in ((axes[0], train, "train loss"), (axes[1], val, metric)):
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / "plots" / "training_progress.png"
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def count_params(model):
    """(all parameters, trainable parameters). Used by every trainer."""
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


# -----------------------------------------------------------------------------
# stopping: signals and the STOP file

def install_stop_handlers():
    """SIGTERM/SIGINT (and CTRL_BREAK on Windows) ask the loop to stop after the current step.
    A second Ctrl-C stops at once. Returns the flag dict the loop polls via stop_requested.
    Used by start_run; train_lm.py's start (so train_sft.py too), for its DDP ranks."""
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
    can't reach a detached process, e.g. Windows).
    Used by every trainer, every step."""
    if not flag["stop"] and (Path(out) / "STOP").exists():
        flag["stop"] = "STOP file"
    return flag["stop"]


# -----------------------------------------------------------------------------
# several processes: torchrun (DDP; gloo on CPU, NCCL on CUDA)
#
# Every trainer runs the same under `torchrun --nproc_per_node N train_X.py ...`: --batch-size is
# the effective batch of each process, so the global batch is N times it. The global batch's items
# stay a pure function of (seed, step) and rank r trains on its slice, so N processes follow the
# 1-process run at the same global batch and a resume is exact. Rank 0 alone writes the run folder.

def ddp_env(args):
    """(rank, world, local_rank) from torchrun's environment; (0, 1, 0) without it. Under torchrun
    on CUDA it also picks this rank's GPU, before setup_device, so "cuda" then means that GPU.
    Used by every trainer's main, before open_run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun sets RANK / WORLD_SIZE / LOCAL_RANK
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and args.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, world, local_rank


def check_world_size(state, resumed_from, world):
    """A checkpoint resumes only on as many processes as wrote it: the batches and the ranks'
    slices of them depend on the process count. Used by every trainer after open_run."""
    was = state.get("world_size", 1) if isinstance(state, dict) else 1
    if state is not None and was != world:
        raise UserError(f"{resumed_from} was trained on {was} process(es), this is {world}; "
                        f"resume with the same --nproc_per_node, or use a new --out")


def start_ranks(out, args, trainer, metric_name, notes, rank, world, device):
    """start_run on rank 0; on the other ranks a silent log, a status dict nobody writes and the
    stop handlers (they still stop cleanly on SIGTERM from torchrun). Then the process group,
    its backend chosen by the device. Returns (log, status, stop). Used by every trainer."""
    if rank == 0:
        log, status, stop = start_run(out, args, trainer, metric_name, notes)
    else:
        log, status, stop = (lambda msg: None), {"started": time.time()}, install_stop_handlers()
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return log, status, stop


def end_ranks(world):
    """Leave the process group (under torchrun). Used by every trainer's main, in `finally`."""
    if world > 1:
        if dist.is_initialized():
            dist.destroy_process_group()


def ddp_wrap(model, device, world, local_rank):
    """(the model that trains, the no_sync for common.train_step): DDP-wrapped under torchrun, so
    gradients are averaged over ranks once per step (on the last micro-batch), else itself and None.
    Save the unwrapped model. Used by every trainer."""
    if world == 1:
        return model, None
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return ddp, ddp.no_sync


def all_ranks(value, op, device, world):
    """A number agreed by every rank: op is "sum", "min" or "max"; itself on one process.
    Used by every trainer (the logged loss, the micro-batch after an OOM halving, stop, best)."""
    if world == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.item()


def agree_batch(micro_bs, accum, device, world):
    """The same (micro-batch, accumulation) on every rank: each rank's probe may fit another
    micro-batch (another GPU's free memory), so all take the smallest micro-batch and the largest
    accumulation, and the global batch has one size. Used by train_gru.py, train_classifier.py,
    train_asr.py, after choose_batch_size."""
    if world == 1:
        return micro_bs, accum
    return int(all_ranks(micro_bs, "min", device, world)), int(all_ranks(accum, "max", device, world))


def barrier(world):
    """No rank runs ahead of rank 0 writing a checkpoint. Used by every trainer."""
    if world > 1:
        dist.barrier()


def seed_rank_step(seed, step, rank, world):
    """Under torchrun, reseed this rank's torch RNG (dropout, augmentation) from (seed, step, rank)
    before each step: the ranks must not draw the same masks, and a checkpoint holds one RNG state
    (rank 0's), so a resumed rank could not go on with its own stream. One process: nothing (its
    stream is in the checkpoint). With dropout, N processes follow one process in distribution,
    not number for number. Used by train_gru.py, train_classifier.py, train_asr.py."""
    if world > 1:
        torch.manual_seed((seed * 1_000_003 + step) * world + rank)


def rank_slice(items, rank, world):
    """This rank's contiguous share of the global batch's items (a 1-D index tensor or a list),
    as equal as they divide; empty when there are fewer items than ranks.
    Used by train_gru.py, train_classifier.py, train_asr.py."""
    n = len(items)
    lo, hi = rank * n // world, (rank + 1) * n // world
    return items[lo:hi]


# -----------------------------------------------------------------------------
# run folders as the background-run manager (memory_optimizer.py) sees them

def list_runs(root="runs"):
    """[(run folder, status dict)] for every run under root and every folder listed in
    root/started.txt (where `memory_optimizer.py start` records runs it launched with an --out
    elsewhere), newest first; each folder once, a gone one skipped, an unreadable status.json {}.
    Used by train_gru.py, train_asr.py, memory_optimizer.py (status, monitor, stop)."""
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


def process_is_trainer(status):
    """True if status['pid'] is alive and really is the trainer of the run status['out']: a python
    process created when status['pid_created'] says (within 1 s; a recycled PID has another
    create time), with the trainer's script as one of its arguments (`python -u train_gru.py ...`,
    also torchrun's rank-0 worker) and, when its arguments give --out, that folder (against its
    cwd) is status['out']. Without pid_created or out nothing is proved: False (a pager showing
    train_gru.py is no trainer). memory_optimizer.py stop signals only such a pid.
    Used by prepare_run_dir; memory_optimizer.py (status, monitor, stop)."""
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


def new_status(trainer, out, metric_name):
    """The status dict a trainer starts with (pid + its create time identify the process).
    Used by start_run."""
    return {"state": "starting", "pid": os.getpid(), "pid_created": psutil.Process().create_time(),
            "trainer": trainer, "out": str(Path(out).resolve()), "started": time.time(),
            "log": str((Path(out) / "train.log").resolve()), "metric_name": metric_name}


def moved_cli():
    """`python common.py start ...`, the run manager's old home: one line naming the new command."""
    raise UserError("common.py is the trainers' shared library; the run manager moved: python memory_optimizer.py "
                    + (" ".join(sys.argv[1:]) or "status"))


if __name__ == "__main__":
    run_main(moved_cli)
