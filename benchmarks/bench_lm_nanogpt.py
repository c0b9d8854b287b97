"""bench_lm_nanogpt.py -- train_lm.py's defaults against a real nanoGPT checkout, side by side, at
nanoGPT's CPU shape (4 layers, 4 heads, width 128, context 64, batch 12) for 2,000 steps.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt     # any checkout; nothing is copied here
    python benchmarks/bench_lm_nanogpt.py --nanogpt /tmp/nanogpt   # ~20 min on 2 busy cores, 1 thread
    python benchmarks/bench_lm_nanogpt.py                          # our two schedules only
    python benchmarks/bench_lm_nanogpt.py --nanogpt /tmp/nanogpt --steps 40   # smoke run, ~1 min
    python benchmarks/bench_lm_nanogpt.py --nanogpt /tmp/nanogpt --steps 300 --repeats 3 --runs ours,nanogpt
                                                   # the footprint table in docs/lm.md, ~6 min
    python benchmarks/bench_lm_nanogpt.py --nanogpt /tmp/nanogpt --splits 10
                                                   # ours vs nanoGPT paired over 10 held-out folds, ~60 min

The text: Python's documentation topics (pydoc_data.topics, shipped with every Python; nobody here
wrote it), which train_lm.py packs into data/pydoc on first use (this script does that too):
bytes, <eot> (id 256) between the 79 topics, the last 10 % of the stream by position held out.
nanoGPT's train.py reads the very same train.bin / val.bin (both are uint16 token streams), with
a meta.pkl that says vocab_size 257; only the folder is new (written under --work).

Three training runs, one process each, one after another (never side by side, so the wall times
compare), every one with OMP_NUM_THREADS=--threads and no optimal_config.json in its folder:
  ours      train_lm.py with only the shape, batch and step flags: its defaults (--schedule cosine)
  onecycle  the same plus --schedule onecycle --beta2 0.95: train_lm.py's old default
  nanoGPT   its train.py with config/train_shakespeare_char.py's recipe (lr 1e-3, warmup 100,
            cosine to 1e-4, beta2 0.99, weight decay 0.1, clip 1.0) at the same shape, dropout 0,
            fp32 on the CPU, no compile; it saves its checkpoint after exactly --steps steps
Then this process scores each final model on the WHOLE validation stream, cut into the same
non-overlapping windows (train_lm.val_windows), with the same summed cross-entropy: nats per
byte (a byte is a token). nanoGPT's model class is imported from the checkout at run time.
Wall time is each process's whole life (start-up, data, its own evals, saving); tokens/s is the
tokens trained (steps x 12 x 64) over that wall time. CPU s is the CPU time the process used (user
+ system): on a shared machine the fairer speed figure, tokens/CPU-s. Peak RSS is the process's
high-water mark (os.wait4's ru_maxrss: start-up, the end and any child included), the footprint a
user sees; on a loaded machine it moves far less than the speed.
With --repeats R every run goes R times, in turn (ours, nanoGPT, onecycle, ours, ...), and each
column is the median; val loss is the first repeat's (a run's numbers do not depend on the repeat).
With --splits N (2 to 10) the comparison is paired over N fresh splits instead: split r holds out
the r-th tenth of the whole stream (train.bin and val.bin joined, by position; split 9 is the
default split above) and trains on the other nine tenths, joined with one <eot> at the seam.
ours and nanoGPT train on each split in turn; the table prints each split's val nats/byte, then
the means, ours minus nanoGPT with its standard error over the splits, the splits ours is ahead
on, and the medians of CPU s and peak RSS.
Python byte-compiles imported modules into a cache the first time (for train_lm.py: common.py,
1,700 lines; for nanoGPT: model.py); a user's second run reads it. The runs here get that cache
under --work (PYTHONPYCACHEPREFIX), filled before the first run, also where the environment sets
PYTHONDONTWRITEBYTECODE (compiling common.py at every start costs ~5 MB of RSS). The two scripts
run as __main__ are compiled at every start, as for a user (train_lm.py ~1,230 lines, ~4 MB).
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import pos_int  # noqa: E402  (the trainers' flag types)

L, H, D, T, B = 4, 4, 128, 64, 12  # nanoGPT's CPU shape (its README's shakespeare_char laptop line)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--nanogpt", default=None, metavar="DIR",
                    help="a nanoGPT checkout (holds train.py, model.py, configurator.py); without it the "
                         "nanoGPT row is skipped")
parser.add_argument("--steps", type=pos_int, default=2000, metavar="N", help="optimizer steps, every run")
parser.add_argument("--threads", type=pos_int, default=1, metavar="N", help="OMP_NUM_THREADS of every run")
parser.add_argument("--work", default=None, metavar="DIR",
                    help="where the runs write (default: a new temporary folder, removed at the end)")
parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every run trains")
parser.add_argument("--repeats", type=pos_int, default=1, metavar="R",
                    help="processes per run, in turn; the table shows medians (val loss: the first repeat's)")
parser.add_argument("--runs", default="ours,nanogpt,onecycle", metavar="A,B",
                    help="which runs, comma-separated, of ours, nanogpt, onecycle")
parser.add_argument("--splits", type=pos_int, default=None, metavar="N",
                    help="2-10: ours and nanoGPT paired over N held-out tenths of the stream (needs --nanogpt)")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def timed(cmd, cwd, env, log_path):
    """Run cmd to the end with its output in log_path; returns (wall s, CPU s, peak RSS MB). The
    CPU time is what the run itself used: on a machine shared with other work it varies far less
    than the wall time, which also counts the time spent waiting for a core. The peak RSS is
    os.wait4's ru_maxrss (kilobytes on Linux, bytes on macOS); None where there is no wait4."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if hasattr(os, "wait4"):
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            cpu, rss = ru.ru_utime + ru.ru_stime, ru.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
        else:  # Windows
            p.wait()
            cpu = rss = None
    if p.returncode != 0:
        print(open(log_path).read()[-3000:], file=sys.stderr)
        fail(f"{' '.join(map(str, cmd[:3]))} ... exited {p.returncode}; its log is above ({log_path})")
    return time.perf_counter() - t0, cpu, rss


def warm_bytecode(env, paths):
    """Byte-compile the modules the runs import into env's PYTHONPYCACHEPREFIX, as a user's first
    run leaves them (see the docstring)."""
    code = "import py_compile, sys\nfor p in sys.argv[1:]: py_compile.compile(p, doraise=True)"
    subprocess.run([sys.executable, "-c", code, *map(str, paths)], env=env, check=True)


def val_nats(forward, windows, device):
    """Summed next-byte cross-entropy over all windows / their tokens: nats per byte.
    forward(x) maps (b, T) ids to (b, T, V) logits. The same for every model."""
    import torch
    import torch.nn.functional as F
    total, n = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), 64):
            x = windows[i:i + 64].to(device)
            logits = forward(x[:, :-1].contiguous())  # (b, T, V); nanoGPT's loss .view()s its input
            total += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            n += x[:, 1:].numel()
    return total / n


def checkout(path):
    """The nanoGPT checkout at `path` (a Path), or exit 2 saying how to get one."""
    ng = Path(path).expanduser().resolve()
    if not all((ng / f).is_file() for f in ("train.py", "model.py", "configurator.py",
                                            "config/train_shakespeare_char.py")):
        fail(f"--nanogpt {path}: not a nanoGPT checkout (needs train.py, model.py, configurator.py, "
             "config/train_shakespeare_char.py); get one with `git clone https://github.com/karpathy/nanoGPT`")
    return ng


def prepare_data(work):
    """Our packed corpus (packed on first use) and a copy of its two token files in the folder
    layout nanoGPT reads, under work: (our data dir, its meta.json, nanoGPT's data dir)."""
    import train_lm
    os.chdir(REPO)  # the built-in corpus lives in <repo>/data/pydoc, packed on first use
    data = train_lm.builtin_corpus(lambda msg: print(msg, file=sys.stderr)).resolve()
    meta = json.loads((data / "meta.json").read_text())
    ngdata = work / "nanogpt_data"
    ngdata.mkdir(exist_ok=True)
    for name in ("train.bin", "val.bin"):
        shutil.copyfile(data / name, ngdata / name)
    with open(ngdata / "meta.pkl", "wb") as fh:  # nanoGPT reads only vocab_size from it
        pickle.dump({"vocab_size": meta["vocab_size"]}, fh)
    return data, meta, ngdata


def nanogpt_cmd(ngdata, out_dir, device, steps, shape, log_interval):
    """nanoGPT's train.py, unmodified: config/train_shakespeare_char.py's recipe, our shape
    (layers, heads, width, context, batch), dropout 0, fp32, no compile; it saves its checkpoint
    after exactly `steps` steps. Run it with cwd = the checkout (configurator.py is read from
    there; it writes only into out_dir)."""
    L, H, D, T, B = shape
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--dataset={ngdata}",
            f"--out_dir={out_dir}", f"--device={device}", "--compile=False", "--dtype=float32",
            "--eval_iters=20", f"--eval_interval={steps}", "--always_save_checkpoint=True",
            f"--log_interval={log_interval}", f"--block_size={T}", f"--batch_size={B}", f"--n_layer={L}",
            f"--n_head={H}", f"--n_embd={D}", f"--max_iters={steps}", f"--lr_decay_iters={steps}",
            "--dropout=0.0", f"--warmup_iters={min(100, steps // 10)}"]  # as ours: a tenth of a short run at most


def nanogpt_forward(ng, out_dir, steps, device):
    """nanoGPT's final model from out_dir/ckpt.pt, its GPT class imported from the checkout at
    run time: forward(x) maps (b, T) ids to (b, T, V) logits."""
    import torch
    ckpt = torch.load(out_dir / "ckpt.pt", map_location=device, weights_only=True)
    if ckpt["iter_num"] != steps:
        fail(f"nanoGPT saved its checkpoint at iteration {ckpt['iter_num']}, not {steps}")
    spec = importlib.util.spec_from_file_location("nanogpt_model", ng / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its parameter count; the table owns stdout
        model = mod.GPT(mod.GPTConfig(**ckpt["model_args"])).to(device)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    return lambda x: model(x, x)[0]  # targets given: logits at every position


def ours_forward(out, steps, device):
    """train_lm.py's model after `steps` steps from out's checkpoint: (forward, its step)."""
    import torch
    import train_lm
    state = torch.load(out / "checkpoints" / f"ckpt_step{steps:08d}.pt", map_location=device, weights_only=True)
    model = train_lm.LM(state["model_cfg"]).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state["step"]


def split_data(data, meta, r, work):
    """Split r: the r-th tenth of the whole stream held out, the rest (joined by one <eot>) to train,
    in one folder both read (meta.json for ours, meta.pkl for nanoGPT). Returns (folder, val tokens)."""
    import numpy as np
    import train_lm
    stream = np.concatenate([np.fromfile(data / f, dtype=train_lm.DTYPE) for f in ("train.bin", "val.bin")])
    lo, hi = len(stream) * r // 10, len(stream) * (r + 1) // 10
    seam = np.array([train_lm.EOT] if 0 < lo and hi < len(stream) else [], dtype=train_lm.DTYPE)
    train, val = np.concatenate([stream[:lo], seam, stream[hi:]]), stream[lo:hi]
    d = work / f"split{r}"
    d.mkdir(exist_ok=True)
    train.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    (d / "meta.json").write_text(json.dumps(dict(meta, train_tokens=len(train), val_tokens=len(val))))
    with open(d / "meta.pkl", "wb") as fh:
        pickle.dump({"vocab_size": meta["vocab_size"]}, fh)
    return d, len(val)


def paired_splits(args, ng, work, data, meta, env, flags):
    """--splits N: ours and nanoGPT on each split in turn, each final model scored on its split's whole
    held-out tenth; prints one row per split and the paired summary."""
    import torch
    import train_lm
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    rows, nats, runs = [], {"ours": [], "nanogpt": []}, {"ours": [], "nanogpt": []}
    for r in range(args.splits):
        d, n_val = split_data(data, meta, r, work)
        windows = train_lm.val_windows(d / "val.bin", n_val, T, n_val)
        for key in ("ours", "nanogpt"):
            out = work / f"{key}-split{r}"
            if key == "ours":
                cmd, cwd = [sys.executable, str(REPO / "train_lm.py"), *flags, "--data", str(d), "--out", str(out)], work
            else:
                cmd, cwd = nanogpt_cmd(d, out, args.device, args.steps, (L, H, D, T, B), 100), ng
            print(f"split {r}, {key}: {' '.join(map(str, cmd[1:]))}", file=sys.stderr, flush=True)
            runs[key].append(timed(cmd, cwd, env, work / f"{key}-split{r}.log"))
            forward = ours_forward(out, args.steps, device)[0] if key == "ours" else \
                nanogpt_forward(ng, out, args.steps, device)
            nats[key].append(val_nats(forward, windows, device))
            shutil.rmtree(out, ignore_errors=True)
        rows.append([str(r), f"{n_val:,}", f"{nats['ours'][-1]:.4f}", f"{nats['nanogpt'][-1]:.4f}",
                     f"{nats['ours'][-1] - nats['nanogpt'][-1]:+.4f}"])
    wall_all, others = benchlib.cpu_watch_end(t_start, kids0)
    diff = [a - b for a, b in zip(nats["ours"], nats["nanogpt"])]
    se = statistics.stdev(diff) / len(diff) ** 0.5
    res = dict(benchlib.runtime_info(device, "fp32"), threads=args.threads)
    benchlib.print_header("train_lm.py vs nanoGPT, paired over held-out splits", sys.argv, res, busy, others)
    print(f"workload: {L} layers, {H} heads, width {D}, context {T}, batch {B} x 1, {args.steps} steps; split r "
          f"holds out the r-th tenth of {data}'s {meta['train_tokens'] + meta['val_tokens']:,} bytes  \n")
    benchlib.print_table(["split", "held-out bytes", "ours val nats/byte", "nanoGPT val nats/byte",
                          "ours minus nanoGPT"], rows)
    med = {k: [statistics.median(x) for x in zip(*v)] for k, v in runs.items()}  # wall, CPU s, peak RSS
    print()
    benchlib.print_table(["run", "mean val nats/byte", "ours minus it (± 1 s.e.)", "splits ours ahead",
                          "median CPU s", "median peak RSS MB"],
                         [["train_lm.py defaults", f"{statistics.mean(nats['ours']):.4f}", "", "",
                           f"{med['ours'][1]:.0f}", f"{med['ours'][2]:.0f}"],
                          ["nanoGPT, shakespeare_char recipe", f"{statistics.mean(nats['nanogpt']):.4f}",
                           f"{statistics.mean(diff):+.4f} ± {se:.4f}", f"{sum(x < 0 for x in diff)} of {len(diff)}",
                           f"{med['nanogpt'][1]:.0f}", f"{med['nanogpt'][2]:.0f}"]])
    print()
    benchlib.print_footer(busy, others, wall_all)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main():
    args = parser.parse_args()
    ng = checkout(args.nanogpt) if args.nanogpt else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_lm_nanogpt-"))
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    import train_lm
    data, meta, ngdata = prepare_data(work)

    # -- the runs, one at a time
    keys = [k for k in ["ours", "nanogpt", "onecycle"] if k in args.runs.split(",")]
    if not keys or set(args.runs.split(",")) - set(keys):
        fail(f"--runs {args.runs}: give some of ours, nanogpt, onecycle")
    if args.splits is not None and (not ng or not 2 <= args.splits <= 10):
        fail(f"--splits {args.splits}: give 2 to 10 splits, with --nanogpt DIR")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPYCACHEPREFIX=str(work / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    warm_bytecode(env, [REPO / "common.py", REPO / "precision_probe.py"] + ([ng / "model.py"] if ng else []))
    shape = ["--n-layer", str(L), "--n-head", str(H), "--d-model", str(D), "--seq-len", str(T),
             "--batch-size", str(B), "--grad-accum", "1", "--max-steps", str(args.steps)]
    # not training settings: no evaluation before the end, one checkpoint, quiet log
    plumbing = ["--device", args.device, "--eval-every", "0", "--save-every",
                str(args.steps), "--log-every", "100", "--no-resume"]
    if args.splits:
        return paired_splits(args, ng, work, data, meta, env, shape + plumbing)
    plumbing += ["--data", str(data)]
    runs = {"ours": ("train_lm.py defaults", []),
            "onecycle": ("train_lm.py --schedule onecycle --beta2 0.95 (old default)",
                         ["--schedule", "onecycle", "--beta2", "0.95"])}
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    measured, kept, chose = {}, {}, {}
    for rep in range(args.repeats):
        for key in keys:
            if key == "nanogpt":
                if not ng:
                    continue
                out = work / f"nanogpt{rep}"
                cmd = nanogpt_cmd(ngdata, out, args.device, args.steps, (L, H, D, T, B), 100)
                cwd = ng
            else:
                out = work / f"{key}{rep}"
                cmd = [sys.executable, str(REPO / "train_lm.py"), *shape, *runs[key][1], *plumbing, "--out", str(out)]
                cwd = work  # no optimal_config.json there
            print(f"running {key} ({rep + 1}/{args.repeats}): {' '.join(map(str, cmd[1:]))}", file=sys.stderr,
                  flush=True)
            measured.setdefault(key, []).append(timed(cmd, cwd, env, work / f"{key}{rep}.log"))
            # the precision each run trained in: ours measures bf16 against fp32 at start (auto)
            chose.setdefault(key, []).append("fp32" if key == "nanogpt" else
                                             json.loads((out / "args.json").read_text())["chosen"]["precision"])
            kept.setdefault(key, out)  # the first repeat's model is scored
    wall_all, others = benchlib.cpu_watch_end(t_start, kids0)

    # -- score every final model on the whole validation stream, same windows
    import torch
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    windows = train_lm.val_windows(data / "val.bin", meta["val_tokens"], T, meta["val_tokens"])
    rows = []
    for key in keys:
        if key not in measured:
            continue
        if key == "nanogpt":
            forward = nanogpt_forward(ng, kept[key], args.steps, device)
            label, steps = f"nanoGPT ({ng.name}), shakespeare_char recipe", args.steps
        else:
            forward, steps = ours_forward(kept[key], args.steps, device)
            label = runs[key][0]
        nats = val_nats(forward, windows, device)
        wall, cpu, rss = (statistics.median(x) if None not in x else None for x in zip(*measured[key]))
        rows.append([label, f"{nats:.4f}", f"{nats / math.log(2):.4f}", str(steps), f"{wall:.0f}",
                     f"{steps * B * T / wall:,.0f}", f"{cpu:.1f}" if cpu else "-",
                     f"{steps * B * T / cpu:,.0f}" if cpu else "-", f"{rss:.0f}" if rss else "-",
                     " ".join(f"{r:.0f}" for _, _, r in measured[key]) if rss else "-", " ".join(chose[key])])

    res = dict(benchlib.runtime_info(device, "fp32"), threads=args.threads)
    benchlib.print_header("train_lm.py vs nanoGPT at nanoGPT's CPU shape", sys.argv, res, busy, others)
    print(f"workload: {L} layers, {H} heads, width {D}, context {T}, batch {B} x 1, {args.steps} steps, "
          f"{args.repeats} repeat(s) in turn, medians; "
          f"{data} ({meta['train_tokens']:,} train / {meta['val_tokens']:,} val bytes); validation: all "
          f"{len(windows)} non-overlapping {T}-byte windows of val.bin  \n")
    benchlib.print_table(["run", "val nats/byte", "bits/byte", "steps", "wall s", "tokens/s",
                         "CPU s", "tokens/CPU-s", "peak RSS MB", "RSS per repeat", "precision"], rows)
    if not ng:
        print("\nnanoGPT row skipped: no --nanogpt DIR given  ")
    print()
    benchlib.print_footer(busy, others, wall_all)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
