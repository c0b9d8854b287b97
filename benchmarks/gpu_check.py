"""gpu_check.py -- one command, one table: every CUDA path of the five trainers, in about 8 minutes on one GPU.

    python benchmarks/gpu_check.py      # any CUDA GPU (H100, A100, L4, T4, ...); a CPU-only machine: one line, exit 0

Every row says pass, FAIL or not run (with why), and a figure; the script exits 1 if a row FAILs. Each subprocess
has a time limit (a hung run is killed with its process group and its row FAILs with "timeout"), and all of them
together end within BUDGET_S: a row that cannot start or finish by then says "not run: budget spent". The trainers
run in parallel (one chain of runs per trainer, as many chains at once as the card's memory allows; a chain runs
its trainer's commands one after another). T is each trainer (gru classifier asr lm sft); every training command
also gets --device cuda, its own --out in a temporary folder and a --config that sets nothing; asr's --quick runs
get --dataset-size 200 (each run ends by decoding its test split with beam search, one utterance at a time). They
run in the repository folder, so data/ keeps the built-in sets, as after any trainer's first run.

In this process, on tiny models (common.py):
  train_step OOM halving    a step needing ~1.6 GB under a 0.5 GB cap halves its micro-batch and gives the uncapped
                            step's gradient
  GradScaler inf step       fp16: a step with inf gradients is skipped, the scale halves, the next step trains
  TF32                      common.setup_device turns TF32 on (Ampere+; not run on older GPUs)
  NCCL, 1 process           a one-process NCCL group: all_reduce, one DDP step through train_step's no_sync
Per trainer, in subprocesses (the command, then what passes):
  default preset, auto      python train_T.py --max-steps 10 (asr: --dataset-size 400, so that its end-of-run beam
                            search decodes 50 test utterances, not 375): finishes with a finite metric in bf16
                            (fp16 where the GPU lacks native bf16), TF32 on (Ampere+); the figure says how the batch
                            was chosen (the probe, or a preset's or mode's batch)
  default preset, fp16      the same with --precision fp16: finishes in fp16; the last checkpoint holds a GradScaler
                            state (its scale is the figure)
  kill -9 and resume        python train_T.py --quick --batch-size 8 --grad-accum 2 --max-steps 12 --save-every 4
                            --keep 5, with CUBLAS_WORKSPACE_CONFIG=:4096:8 (the trainers have no deterministic flag):
                            run once to the end; run again in a new folder, SIGKILL its process group as soon as its
                            first checkpoint exists, and rerun that same command (it resumes). The figure is the max
                            abs difference of the final weights. The two runs' first checkpoints (two fresh runs,
                            same step) say whether this trainer's kernels are deterministic here: if they agree bit
                            for bit the resumed weights must too, else they must agree within RESUME_TOL
  inference command         against the default run's folder: gru --suggest, classifier --predict, asr --transcribe
                            (a WAV written here), lm sample, sft ask; the answer's line must be printed
  plan vs peak, worst batch the default preset on data whose items all have one length (lm: the default run itself,
                            every window is seq_len long), so every step is the probe's worst batch;
                            memory_plan_mb.total / peak_tensor_mb (max_memory_allocated in the largest step) must be
                            within PLAN_BAND
  --gpu-memory OOM halving  --quick --batch-size B --grad-accum 1 (B = the whole quick train split; classifier with
                            --preset small: fasttext's step is too small to overflow): once with --plan to read the
                            step's planned memory, then one step under --gpu-memory of a third of it: the output
                            must say "micro-batch halved" and the step's checkpoint count B samples trained
  --optim adamw8bit         --quick --batch-size 8 --grad-accum 2 --max-steps 6 --optim adamw8bit: finishes; its
                            optimizer state at most ADAMW8BIT_MAX of the kill-and-resume run's AdamW state
  --grad-checkpointing      --quick --batch-size 8 --grad-accum 2 (gru --preset original, classifier --preset small:
                            the default presets have no layers to recompute) --max-steps 4 --grad-checkpointing:
                            finishes; its planned activations below the same command's --plan without the flag
  --resource-efficient      --quick --max-steps 6 --resource-efficient: finishes; the figure is the batch it chose
  --compile                 --quick --batch-size 8 --grad-accum 2 --max-steps 6 --compile (lm, sft; the others:
                            "not run: no such flag", read from their --help)
  torchrun, 2 NCCL ranks    python -m torch.distributed.run --standalone --nproc_per_node 2 train_gru.py --quick
                            --max-steps 5: world_size 2 in summary.json; "not run: 1 GPU" on one GPU
One table at the end: check | trainer | result | figure.

For the tests only (tests/test_gpu_check.py): GPU_CHECK_DEVICE=cpu runs the same rows on the CPU (rows that need
CUDA say "not run: CPU"; --measure-peak supplies the peak), in a temporary working folder, for the trainers named in
GPU_CHECK_TRAINERS (comma-separated; default all). Without it and without CUDA the script prints one line, exits 0.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = ["gru", "classifier", "asr", "lm", "sft"]
BUDGET_S = 450  # every subprocess ends by then; with startup and the in-process checks, under 8 minutes
RUN_TIMEOUT_S = 150  # one --quick run (a hung one is killed here and its row FAILs)
DEFAULT_TIMEOUT_S = 240  # one default-preset run (the asr and sft ones decode their test split at the end)
COMPILE_TIMEOUT_S = 300  # torch.compile's first steps compile the model
DEFAULT_STEPS = 10
QUICK_BATCH = ["--batch-size", "8", "--grad-accum", "2"]  # explicit: no probe, the same batch in every run
RESUME_STEPS, RESUME_EVERY = 12, 4
RESUME_TOL = 1e-3  # max abs weight difference allowed where two fresh runs already differ (nondeterministic kernels)
PLAN_BAND = (0.75, 1.25)  # memory_plan_mb.total / peak_tensor_mb
ADAMW8BIT_MAX = 0.35  # 8-bit state / AdamW state: ~0.25 for big tensors, small ones (< 4,096 values) stay fp32
# asr ends every run by beam-searching its test split, one utterance at a time: smaller built-in sets keep that short
DEFAULT_EXTRA = {"asr": ["--dataset-size", "400"]}  # the default preset (optimized) on 400 utterances: 50 to decode
QUICK_EXTRA = {"asr": ["--dataset-size", "200"]}  # every --quick run: 25 to decode
GC_EXTRA = {"gru": ["--preset", "original"], "classifier": ["--preset", "small"]}
OOM_EXTRA = {"classifier": ["--preset", "small"]}
# the most samples a step can hold on each trainer's --quick data (about its train split): the OOM run's batch
QUICK_MAX_BATCH = {"gru": 4096, "classifier": 512, "asr": 200, "lm": 4096, "sft": 2048}
CHECKS = ["train_step OOM halving", "GradScaler inf step", "TF32", "NCCL, 1 process", "--help",
          "default preset, auto", "default preset, fp16", "kill -9 and resume", "inference command",
          "plan vs peak, worst batch", "--gpu-memory OOM halving", "--optim adamw8bit", "--grad-checkpointing",
          "--resource-efficient", "--compile", "torchrun, 2 NCCL ranks"]
START = time.time()


@dataclasses.dataclass
class Ctx:
    """What every row needs: the device the trainers run on, where they run, the deadline."""
    device: str  # "cuda", or "cpu" under GPU_CHECK_DEVICE=cpu (the tests)
    cwd: Path  # the trainers' working folder (their data/ caches)
    tmp: Path  # run folders, their output, the data files written here
    deadline: float
    expect_precision: str = None  # what --precision auto must choose; None: whatever (a CPU measures it)
    tf32: bool = False  # Ampere+: setup_device must say "TF32 on"
    gpus: int = 0
    threads: int = 0  # OMP_NUM_THREADS for each run, so that parallel chains share the cores

    @property
    def cpu(self):
        return self.device == "cpu"

    @property
    def peak_flags(self):  # a CPU has no max_memory_allocated: the profiler measures the peak
        return ["--measure-peak"] if self.cpu else []


def row(check, trainer, ok, figure):
    """One table row; ok True (pass), False (FAIL) or None (not run: the figure says why)."""
    return (check, trainer, {True: "pass", False: "FAIL", None: "not run"}[ok], str(figure))


def say(msg):
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)  # progress; the table goes to stdout


# -----------------------------------------------------------------------------
# in-process checks of common.py (CUDA only)

def check_oom_recovery(common, dev):
    """A step that needs ~1.6 GB under a 0.5 GB cap: train_step must halve until it fits and give
    the gradient of the whole batch (compared with an uncapped step at full size; TF32 is off here)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 8192), torch.nn.ReLU(), torch.nn.Linear(8192, 1)).to(dev)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"x": torch.randn(16384, 256, device=dev), "y": torch.randn(16384, device=dev)}

    def loss_fn(m, b):  # per sample ~100 KB saved for backward, so 16,384 samples need ~1.6 GB
        return ((m(b["x"]).squeeze(1) - b["y"]) ** 2).sum(), len(b["x"])

    def step(cap_gb, log):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), dev)
        try:
            loss, n, used = common.train_step(model, opt, scaler, batch, loss_fn, 16384, clip=0.0, device=dev,
                                              amp_dtype=None, log=log)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, dev)
            torch.cuda.empty_cache()
        return loss, n, used, [p.detach().clone() for p in model.parameters()]

    total = torch.cuda.get_device_properties(dev).total_memory
    logs, ref_logs = [], []
    loss, n, used, weights = step(0.5, logs.append)
    ref_loss, _, _, ref = step(total / 2**30, ref_logs.append)  # the whole card: no halving
    same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(weights, ref))
    ok = bool(logs) and "micro-batch halved" in logs[0] and n == 16384 and same and math.isclose(
        loss, ref_loss, rel_tol=1e-4)
    return row("train_step OOM halving", "common", ok,
               f"16384 under 0.5 GB: {len(logs)} halvings to {used}, {n} samples, same step as uncapped: {same}")


def check_scaler_skip(common, dev):
    """fp16 overflow: the step is skipped (weights unchanged) and the scale halves; the next one trains."""
    model = torch.nn.Linear(8, 1).to(dev)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)

    def loss_fn(m, b):
        return m(b["x"]).float().sum(), len(b["x"])

    def step(x):
        common.train_step(model, opt, scaler, {"x": x}, loss_fn, 4, clip=1.0, device=dev, amp_dtype=torch.float16)

    before = model.weight.detach().clone()
    step(torch.full((4, 8), 1e4, device=dev))  # 8 * 1e4 = 8e4 > fp16's largest, 65504: inf output, inf grads
    skipped = torch.equal(model.weight, before) and scaler.get_scale() == 512.0
    step(torch.ones(4, 8, device=dev))
    moved = not torch.equal(model.weight, before) and scaler.get_scale() == 512.0
    return row("GradScaler inf step", "common", skipped and moved,
               f"inf step skipped: {skipped}, scale 1024 -> {scaler.get_scale():g}; next step trained: {moved}")


def check_tf32(common, dev):
    args = argparse.Namespace(device="cuda", precision="auto", gpu_memory=None)
    common.setup_device(args)
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return row("TF32", "common", None, f"pre-Ampere GPU (capability {major}.{minor}): no TF32")
    on = torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    return row("TF32", "common", on, f"capability {major}.{minor}: matmul and cuDNN TF32 {on}")


def check_nccl(common, dev, tmp):
    """A one-process NCCL group: all-reduce, then one DDP step through train_step's no_sync."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_nccl_available()):
        return row("NCCL, 1 process", "common", False, "this torch build has no NCCL")
    dist.init_process_group("nccl", init_method=f"file://{tmp}/nccl_rendezvous", rank=0, world_size=1)
    try:
        t = torch.full((4,), 3.0, device=dev)
        dist.all_reduce(t)
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 1).to(dev), device_ids=[dev.index or 0])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loss, n, _ = common.train_step(ddp, opt, torch.amp.GradScaler("cuda", enabled=False),
                                       {"x": torch.randn(8, 8, device=dev)},
                                       lambda m, b: (m(b["x"]).square().sum(), len(b["x"])), 4, clip=1.0,
                                       device=dev, amp_dtype=None, no_sync=ddp.no_sync)
        ok = torch.equal(t.cpu(), torch.full((4,), 3.0)) and math.isfinite(loss) and n == 8
        v = torch.cuda.nccl.version()  # a tuple; an int on older torch
        nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return row("NCCL, 1 process", "common", ok, f"NCCL {nccl}: all_reduce, DDP step over 2 micro-batches")
    finally:
        dist.destroy_process_group()


def in_process_checks(dev, tmp):
    sys.path.insert(0, str(ROOT))
    import common
    rows = []
    # TF32 last: the OOM check compares fp32 steps
    for name, check in [("train_step OOM halving", lambda: check_oom_recovery(common, dev)),
                        ("GradScaler inf step", lambda: check_scaler_skip(common, dev)),
                        ("TF32", lambda: check_tf32(common, dev)),
                        ("NCCL, 1 process", lambda: check_nccl(common, dev, tmp))]:
        try:
            rows.append(check())
        except Exception as e:  # one broken check must not hide the others' results
            rows.append(row(name, "common", False, f"{type(e).__name__}: {e}"[:160]))
    torch.cuda.empty_cache()  # the OOM check's blocks: the trainers' runs need the card
    return rows


# -----------------------------------------------------------------------------
# running a command: a time limit, a process group to kill, what the run left behind

def spawn(ctx, name, cmd, *, out=None, timeout=RUN_TIMEOUT_S, env=None, kill_when=None):
    """Run cmd in ctx.cwd, its output to tmp/<name>.txt. out: the run folder's name under tmp (--out
    and an empty --config are added). kill_when(): polled every 20 ms; when true the run's process
    group gets SIGKILL (kill -9, loader workers included). A run past its limit is killed the same way.
    Returns {ran, rc (None: killed), secs, text, why, out, summary, args, log}."""
    left = ctx.deadline - time.time()
    if left < 20:
        return {"ran": False, "rc": None, "why": "budget spent", "secs": 0, "text": "", "out": None,
                "summary": {}, "args": {}, "log": ""}
    if out is not None:
        out = ctx.tmp / out
        cmd = cmd + ["--out", str(out), "--config", str(ctx.tmp / "empty_config.json")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if ctx.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    if ctx.threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(ctx.threads)
    limit, t0, how = min(timeout, left), time.time(), None
    with open(ctx.tmp / f"{name}.txt", "w") as f:
        p = subprocess.Popen(cmd, cwd=ctx.cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while p.poll() is None:
            if time.time() - t0 > limit:
                how = "timeout"
            elif kill_when is not None and kill_when():
                how = "killed"
            if how:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError, AttributeError):  # gone, or no killpg (Windows)
                    p.kill()
                p.wait()
                break
            time.sleep(0.02)
    secs = time.time() - t0
    text = (ctx.tmp / f"{name}.txt").read_text(errors="replace")
    rc = None if how else p.returncode
    cut = how == "timeout" and limit < timeout  # stopped by BUDGET_S, not by its own limit: not shown to hang
    why = {"timeout": f"budget spent (stopped after {secs:.0f}s)" if cut else f"timeout after {secs:.0f}s",
           "killed": "killed"}.get(how, f"rc {rc}")
    if rc not in (0, None):  # where it broke: the innermost frame in this repo's files, and the error line
        frames = re.findall(r'File "[^"]*?((?:common|ddp|adamw8bit|records|train_\w+)\.py)", line (\d+), in (\w+)',
                            text)
        errors = [l for l in text.splitlines() if re.match(r"(error:|[\w.]+(Error|Exception):)", l)]
        why += (f", {frames[-1][0]}:{frames[-1][1]} {frames[-1][2]}" if frames else "") + (
            f": {errors[-1][:100]}" if errors else "")
    r = {"ran": not cut, "rc": rc, "how": how, "secs": secs, "text": text, "why": why, "out": out}
    for key in ("summary", "args"):
        f = out / f"{key}.json" if out else None
        r[key] = json.loads(f.read_text()) if f and f.is_file() else {}
    r["log"] = (out / "train.log").read_text(errors="replace") if out and (out / "train.log").is_file() else ""
    say(f"{name}: {why} ({secs:.0f}s)")
    return r


def train(ctx, t, *flags, quick=True):
    return [sys.executable, str(ROOT / f"train_{t}.py"), *(["--quick", *QUICK_EXTRA.get(t, [])] if quick else []),
            "--device", ctx.device, *flags]


def not_ok(r):
    """(None or False, why) for a run that did not start or did not finish."""
    return (None if not r["ran"] else False), r["why"]


def finished(r, precision=None):
    """(ok, figure): rc 0, a finite metric in summary.json, and the precision asked for (summary.json's,
    else args.json's chosen)."""
    if r["rc"] != 0:
        return not_ok(r)
    s = r["summary"]
    got = s.get("precision") or r["args"].get("chosen", {}).get("precision")
    value = s.get("value")
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        return False, f"summary.json: {s.get('metric')} is {value!r}"
    if precision and got != precision:
        return False, f"ran in {got}, not {precision}"
    return True, f"{s.get('metric')} {value:.4g}, {got}, {r['secs']:.0f}s"


def checkpoints(out):
    """{step: path} of out/checkpoints/ckpt_step*.pt (complete files only: a .tmp is not one)."""
    d = Path(out) / "checkpoints"
    return {int(m.group(1)): p for p in d.glob("ckpt_step*.pt") if (m := re.fullmatch(r"ckpt_step(\d+)\.pt", p.name))}


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_abs_diff(a, b):
    """Largest |a - b| over two state_dicts (inf where a key, shape or integer tensor differs)."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if not isinstance(x, torch.Tensor) or x.shape != y.shape:
            return math.inf
        if x.is_floating_point() or x.is_complex():  # in x's own dtype: 0 exactly where the two are equal
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
        elif not torch.equal(x, y):
            return math.inf
    return worst


PLAN_LINE = re.compile(r"memory plan: weights ([\d.]+) MB \+ gradients ([\d.]+) \+ .*? state ([\d.]+) \+ "
                       r"activations ([\d.]+) .*= ([\d.]+) MB")


def plan_of(r):
    """The memory plan a run logged (--plan prints it and stops): {weights, gradients, optimizer, activations,
    total} in MB, or {}."""
    found = PLAN_LINE.findall(r["text"])
    return dict(zip(("weights", "gradients", "optimizer", "activations", "total"), map(float, found[-1]))) \
        if found else {}


def help_flags(ctx, t):
    r = spawn(ctx, f"{t}-help", [sys.executable, str(ROOT / f"train_{t}.py"), "--help"], timeout=60)
    if r["rc"] != 0:
        raise RuntimeError(f"train_{t}.py --help: {r['why']}")
    return set(re.findall(r"--[a-z][a-z0-9-]*", r["text"]))


# -----------------------------------------------------------------------------
# data where every item has the same length, so that every step is the probe's worst batch

def letters(rng, n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(n))


def write_wav(path, seconds=3.0, sr=16000):
    """A 16-bit mono WAV: a tone under noise (what the ASR front end reads; nothing to recognise)."""
    rng = random.Random(0)
    n = int(seconds * sr)
    samples = [int(8000 * math.sin(2 * math.pi * 220 * i / sr) + rng.gauss(0, 2000)) for i in range(n)]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(struct.pack(f"<{n}h", *(max(-32768, min(32767, s)) for s in samples)))
    return path


def uniform_data(ctx, t):
    """The flags that give trainer t data whose items all have one length (lm: none needed)."""
    rng, d = random.Random(0), ctx.tmp / f"{t}-uniform"
    d.mkdir(exist_ok=True)
    if t == "gru":  # 6 words of 5 letters from 2,000 words, 8 categories
        words = [letters(rng, 5) for _ in range(2000)]
        rows = [f"{' '.join(rng.choice(words) for _ in range(6))},cat{rng.randrange(8)}" for _ in range(2000)]
        (d / "queries.csv").write_text("text,category\n" + "\n".join(rows) + "\n")
        return ["--data", str(d / "queries.csv")]
    if t == "classifier":  # 4 words of 6 letters: the same number of word, bigram and character n-grams
        rows = [f"{' '.join(letters(rng, 6) for _ in range(4))},label{i % 4}" for i in range(800)]
        (d / "items.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
        return ["--data", str(d / "items.csv")]
    if t == "asr":  # one 3 s WAV, 200 transcripts of 3 words of 6 letters
        write_wav(d / "u.wav")
        rows = [json.dumps({"audio_filepath": "u.wav", "text": " ".join(letters(rng, 6) for _ in range(3)),
                            "duration": 3.0}) for _ in range(200)]
        (d / "train.jsonl").write_text("\n".join(rows) + "\n")
        return ["--train-manifest", str(d / "train.jsonl")]
    if t == "sft":  # 40-letter requests, 12-letter answers
        rows = [json.dumps({"input": letters(rng, 40), "output": letters(rng, 12)}) for _ in range(400)]
        (d / "pairs.jsonl").write_text("\n".join(rows) + "\n")
        return ["--data", str(d / "pairs.jsonl")]
    return []


# -----------------------------------------------------------------------------
# the rows of one trainer; each returns a row (and what a later row needs)

def row_default(ctx, t):
    r = spawn(ctx, f"{t}-default", train(ctx, t, *DEFAULT_EXTRA.get(t, []), "--max-steps", str(DEFAULT_STEPS),
                                         *ctx.peak_flags, quick=False), out=f"{t}-default", timeout=DEFAULT_TIMEOUT_S)
    ok, fig = finished(r, ctx.expect_precision)
    chosen = r["args"].get("chosen", {})
    why = chosen.get("why", {})
    if ok and ctx.tf32 and "TF32 on" not in why.get("precision", ""):
        ok, fig = False, f"TF32 not on: {why.get('precision')!r}"
    if ok:  # the batch's why: the probe's result, or the table or preset that set it (sft's seed column)
        fig += f"; batch {chosen.get('micro_batch')} x {chosen.get('grad_accum')} ({why.get('batch')})"
    return r, row("default preset, auto", t, ok, fig)


def row_fp16(ctx, t):
    if ctx.cpu:
        return row("default preset, fp16", t, None, "CPU (fp16's GradScaler needs CUDA)")
    r = spawn(ctx, f"{t}-fp16", train(ctx, t, *DEFAULT_EXTRA.get(t, []), "--max-steps", str(DEFAULT_STEPS),
                                      "--precision", "fp16", quick=False), out=f"{t}-fp16", timeout=DEFAULT_TIMEOUT_S)
    ok, fig = finished(r, "fp16")
    if ok:
        ckpts = checkpoints(r["out"])
        scaler = load(ckpts[max(ckpts)]).get("scaler") if ckpts else None
        if not scaler or "scale" not in scaler:
            ok, fig = False, f"the last checkpoint holds no GradScaler state ({scaler!r})"
        else:
            fig += f"; GradScaler scale {float(scaler['scale']):g} at step {max(ckpts)}"
    return row("default preset, fp16", t, ok, fig)


def row_resume(ctx, t):
    """Uninterrupted, then killed after its first checkpoint and rerun: the final weights compared.
    Returns (the uninterrupted run, row)."""
    cmd = train(ctx, t, *QUICK_BATCH, "--max-steps", str(RESUME_STEPS), "--save-every", str(RESUME_EVERY),
                "--keep", "5")
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS picks the same kernels in every run
    check = "kill -9 and resume"
    ref = spawn(ctx, f"{t}-resume-ref", cmd, out=f"{t}-resume-ref", env=env)
    if ref["rc"] != 0:
        return ref, row(check, t, *not_ok(ref))
    out = ctx.tmp / f"{t}-resume"
    killed = spawn(ctx, f"{t}-resume-killed", cmd, out=out.name, env=env, kill_when=lambda: bool(checkpoints(out)))
    if killed["rc"] == 0:
        return ref, row(check, t, None, f"the run finished before the kill ({killed['secs']:.1f}s): "
                                        "raise RESUME_STEPS")
    if killed["how"] != "killed":
        return ref, row(check, t, *not_ok(killed))
    first, ref_ckpts = checkpoints(out), checkpoints(ref["out"])
    k, at_kill = min(first), max(first)
    control = max_abs_diff(load(first[k])["model"], load(ref_ckpts[k])["model"]) if k in ref_ckpts else None
    rerun = spawn(ctx, f"{t}-resume-rerun", cmd, out=out.name, env=env)
    if rerun["rc"] != 0:
        return ref, row(check, t, *not_ok(rerun))
    resumed = re.findall(r"resumed from \S+ \(step (\d+)", rerun["text"])
    if not resumed:
        return ref, row(check, t, False, f"killed with checkpoint(s) up to step {at_kill}; the rerun did not resume")
    a, b = checkpoints(ref["out"]), checkpoints(out)
    if max(a) != RESUME_STEPS or max(b) != RESUME_STEPS:
        return ref, row(check, t, False, f"last checkpoints at steps {max(a)} and {max(b)}, not {RESUME_STEPS}")
    diff = max_abs_diff(load(a[RESUME_STEPS])["model"], load(b[RESUME_STEPS])["model"])
    where = (f"killed at step {at_kill}'s checkpoint, resumed from step {resumed[0]}; "
             f"final weights max |diff| {diff:.3g}")
    if control == 0:
        return ref, row(check, t, diff == 0, f"{where} (bit-exact required: two fresh runs agree bit for bit at "
                                             f"step {k})")
    fresh = (f"two fresh runs differ by {control:.3g} at step {k}" if control
             else f"the uninterrupted run kept no step {k}")
    return ref, row(check, t, diff <= RESUME_TOL, f"{where} (<= {RESUME_TOL:g} required: {fresh})")


INFER = {  # trainer: (the command after train_T.py, with RUN for the run folder; the line that answers)
    "gru": (["--suggest", "red run", "--category", "fashion", "--out", "RUN", "--config", "CONFIG"],
            r"^\s+\S.*\s-?\d+\.\d+\s*$"),
    "classifier": (["--predict", "UBER *TRIP 12.50", "--out", "RUN", "--config", "CONFIG"],
                   r"^\S.*\s+UBER \*TRIP 12\.50\s*$"),
    "asr": (["--transcribe", "WAV", "--out", "RUN", "--config", "CONFIG"], r"^\S*u\.wav\t"),
    "lm": (["sample", "--out", "RUN", "--prompt", "The with statement", "--max-new-tokens", "64"],
           r"^The with statement"),
    "sft": (["ask", "--out", "RUN", "list files by size"], r"^\$ "),
}


def row_infer(ctx, t, default):
    if default["rc"] != 0:
        return row("inference command", t, None, f"the default run did not finish ({default['why']})")
    wav = write_wav(ctx.tmp / "u.wav")
    args, answer = INFER[t]
    args = [{"RUN": str(default["out"]), "CONFIG": str(ctx.tmp / "empty_config.json"), "WAV": str(wav)}.get(a, a)
            for a in args]
    r = spawn(ctx, f"{t}-infer", [sys.executable, str(ROOT / f"train_{t}.py"), *args, "--device", ctx.device])
    if r["rc"] != 0:
        return row("inference command", t, *not_ok(r))
    lines = [l for l in r["text"].splitlines() if re.match(answer, l)]
    return row("inference command", t, bool(lines), f"{args[0]}: {' '.join(lines[0].split())[:50]!r}, {r['secs']:.0f}s"
               if lines else f"{args[0]}: no answer line in its output ({r['text'][-80:]!r})")


def row_plan(ctx, t, default):
    """memory_plan_mb.total against peak_tensor_mb on data where every step is the worst batch."""
    check = "plan vs peak, worst batch"
    if t == "lm":
        r = default  # every LM batch is (micro-batch, seq_len + 1): the worst batch
        if r["rc"] != 0:
            return row(check, t, None, f"the default run did not finish ({r['why']})")
    else:
        r = spawn(ctx, f"{t}-plan", train(ctx, t, *uniform_data(ctx, t), "--max-steps", "4",
                                          *ctx.peak_flags, quick=False), out=f"{t}-plan", timeout=DEFAULT_TIMEOUT_S)
    if r["rc"] != 0:
        return row(check, t, *not_ok(r))
    s = r["summary"]
    plan, peak = (s.get("memory_plan_mb") or {}).get("total"), s.get("peak_tensor_mb")
    if not plan or not peak:
        return row(check, t, False, f"summary.json has no memory_plan_mb.total / peak_tensor_mb ({plan}, {peak})")
    lo, hi = PLAN_BAND
    data = "every window seq_len long" if t == "lm" else "items of one length"
    return row(check, t, lo <= plan / peak <= hi,
               f"plan {plan} MB / peak {peak} MB = {plan / peak:.2f} (band {lo}-{hi}; {data})")


def row_oom(ctx, t):
    check = "--gpu-memory OOM halving"
    if ctx.cpu:
        return row(check, t, None, "CPU (--gpu-memory caps CUDA memory)")
    big = QUICK_MAX_BATCH[t]
    cmd = train(ctx, t, *OOM_EXTRA.get(t, []), "--batch-size", str(big), "--grad-accum", "1")
    p = spawn(ctx, f"{t}-oom-plan", cmd + ["--plan"], out=f"{t}-oom-plan")
    plan = plan_of(p)
    if p["rc"] != 0 or not plan:
        return row(check, t, *(not_ok(p) if p["rc"] != 0 else (False, "--plan printed no memory plan")))
    fixed = plan["weights"] + plan["gradients"] + plan["optimizer"]
    cap_mb = max(plan["total"] / 3, fixed + 128)  # 128 MB over the fixed part: cuBLAS's workspace and a micro-batch
    if plan["total"] < 1.5 * cap_mb:
        return row(check, t, None, f"batch {big} is planned at {plan['total']:.0f} MB: too little to overflow")
    cap = round(cap_mb / 1024, 3)
    r = spawn(ctx, f"{t}-oom", cmd + ["--max-steps", "1", "--gpu-memory", str(cap)], out=f"{t}-oom")
    if r["rc"] != 0:
        return row(check, t, *not_ok(r))
    halved = re.findall(r"micro-batch halved to (\d+)", r["text"])
    ckpts = checkpoints(r["out"])
    samples = load(ckpts[max(ckpts)]).get("samples") if ckpts else None  # what the one step trained on
    fig = f"batch {big} (plan {plan['total']:.0f} MB) under --gpu-memory {cap:g}: "
    return row(check, t, bool(halved) and samples == big, fig + (
        f"halved to {halved[-1]}; the step trained {samples} samples" if halved
        else "no 'micro-batch halved' in its output"))


def row_8bit(ctx, t, ref):
    check = "--optim adamw8bit"
    r = spawn(ctx, f"{t}-8bit", train(ctx, t, *QUICK_BATCH, "--max-steps", "6", "--optim", "adamw8bit"),
              out=f"{t}-8bit")
    ok, fig = finished(r)
    if not ok:
        return row(check, t, ok, fig)
    full, small = ref["summary"].get("optimizer_state_mb"), r["summary"].get("optimizer_state_mb")
    if not full or small is None:
        return row(check, t, False, f"no optimizer_state_mb to compare (AdamW {full}, 8-bit {small})")
    return row(check, t, small / full <= ADAMW8BIT_MAX,
               f"state {small} MB vs AdamW {full} MB = {small / full:.2f} (<= {ADAMW8BIT_MAX}); {fig}")


def row_gc(ctx, t, flags):
    check = "--grad-checkpointing"
    if not flags or "--grad-checkpointing" not in flags:
        return row(check, t, None, "no such flag" if flags else f"train_{t}.py --help failed")
    cmd = train(ctx, t, *GC_EXTRA.get(t, []), *QUICK_BATCH)
    base = spawn(ctx, f"{t}-gc-plan", cmd + ["--plan"], out=f"{t}-gc-plan")
    if base["rc"] != 0 or not plan_of(base):
        return row(check, t, *(not_ok(base) if base["rc"] != 0 else (False, "--plan printed no memory plan")))
    r = spawn(ctx, f"{t}-gc", cmd + ["--max-steps", "4", "--grad-checkpointing"], out=f"{t}-gc")
    ok, fig = finished(r)
    if not ok:
        return row(check, t, ok, fig)
    without, with_ = plan_of(base)["activations"], (r["summary"].get("memory_plan_mb") or {}).get("activations")
    if with_ is None:
        return row(check, t, False, "summary.json has no memory_plan_mb.activations")
    peak = r["summary"].get("peak_tensor_mb")
    preset = f" ({' '.join(GC_EXTRA[t])})" if t in GC_EXTRA else ""
    return row(check, t, with_ < without, f"activations planned {with_} MB vs {without} without{preset}"
               + (f"; peak {peak} MB" if peak else "") + f"; {fig}")


def row_re(ctx, t, flags):
    check = "--resource-efficient"
    if not flags or "--resource-efficient" not in flags:
        return row(check, t, None, "no such flag" if flags else f"train_{t}.py --help failed")
    r = spawn(ctx, f"{t}-re", train(ctx, t, "--max-steps", "6", "--resource-efficient"), out=f"{t}-re")
    ok, fig = finished(r)
    chosen = r["args"].get("chosen", {})
    if ok:
        why = chosen.get("why", {}).get("batch")
        fig += f"; batch {chosen.get('micro_batch')} x {chosen.get('grad_accum')} ({why})"
    return row(check, t, ok, fig)


def row_compile(ctx, t, flags):
    check = "--compile"
    if not flags or "--compile" not in flags:
        return row(check, t, None, "no such flag" if flags else f"train_{t}.py --help failed")
    r = spawn(ctx, f"{t}-compile", train(ctx, t, *QUICK_BATCH, "--max-steps", "6", "--compile"), out=f"{t}-compile",
              timeout=COMPILE_TIMEOUT_S)
    return row(check, t, *finished(r))


def trainer_chain(ctx, t):
    """Every row of trainer t, its runs one after another (they share its data/ cache); the most telling
    rows first, so that a budget that runs out cuts the least."""
    rows = []

    def guard(check, fn, *a):  # a bug here (a KeyError on a changed summary.json) is a FAIL, not a lost table
        try:
            return fn(*a)
        except Exception as e:
            r = row(check, t, False, f"gpu_check error: {type(e).__name__}: {e}"[:160])
            return (None, r) if fn in (row_default, row_resume) else r

    flags = guard("--help", help_flags, ctx, t)
    if isinstance(flags, tuple):  # --help failed: that row FAILs, the flag rows say so
        rows.append(flags)
        flags = None
    default, r = guard("default preset, auto", row_default, ctx, t)
    rows.append(r)
    default = default or {"rc": None, "why": "gpu_check error"}
    rows.append(guard("inference command", row_infer, ctx, t, default))
    ref, r = guard("kill -9 and resume", row_resume, ctx, t)
    rows.append(r)
    ref = ref or {"summary": {}}
    rows.append(guard("default preset, fp16", row_fp16, ctx, t))
    rows.append(guard("plan vs peak, worst batch", row_plan, ctx, t, default))
    rows.append(guard("--gpu-memory OOM halving", row_oom, ctx, t))
    rows.append(guard("--optim adamw8bit", row_8bit, ctx, t, ref))
    rows.append(guard("--grad-checkpointing", row_gc, ctx, t, flags))
    rows.append(guard("--resource-efficient", row_re, ctx, t, flags))
    rows.append(guard("--compile", row_compile, ctx, t, flags))
    return rows


def torchrun_chain(ctx):
    check = "torchrun, 2 NCCL ranks"
    if ctx.cpu:
        return [row(check, "gru", None, "CPU")]
    if ctx.gpus < 2:
        return [row(check, "gru", None, f"{ctx.gpus} GPU (NCCL needs a GPU a rank)")]
    r = spawn(ctx, "gru-torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", str(ROOT / "train_gru.py"), "--quick", "--device", "cuda", "--max-steps", "5"],
              out="gru-torchrun")
    ok, fig = finished(r)
    world = r["summary"].get("world_size")
    return [row(check, "gru", ok and world == 2, f"world_size {world}; {fig}")]


# -----------------------------------------------------------------------------

def print_table(rows):
    order = {c: i for i, c in enumerate(CHECKS)}
    who = {t: i for i, t in enumerate(["common"] + TRAINERS)}
    rows = sorted(rows, key=lambda r: (order.get(r[0], len(order)), who.get(r[1], len(who))))
    head = ("check", "trainer", "result", "figure")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    print(" | ".join(f"{h:<{w}}" for h, w in zip(head, widths + [0])).rstrip())
    print("-+-".join("-" * w for w in widths + [40]))
    for r in rows:
        print(" | ".join(f"{c:<{w}}" for c, w in zip(r, widths + [0])).rstrip())
    failed = sum(r[2] == "FAIL" for r in rows)
    print(f"gpu_check: {len(rows)} rows, {failed} FAIL, {sum(r[2] == 'not run' for r in rows)} not run, "
          f"{time.time() - START:.0f}s")
    return failed


def main():
    cpu = os.environ.get("GPU_CHECK_DEVICE") == "cpu"  # the tests' CPU mode
    if not cpu and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU build"
        print(f"gpu_check: no CUDA device visible to PyTorch (torch {torch.__version__}, {build}); nothing to check")
        return 0
    trainers = [t for t in os.environ.get("GPU_CHECK_TRAINERS", ",".join(TRAINERS)).split(",") if t in TRAINERS]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp = Path(tmp)
        (tmp / "empty_config.json").write_text(json.dumps({"trainers": {t: {} for t in TRAINERS}}))
        rows = []
        if cpu:
            ctx = Ctx(device="cpu", cwd=tmp, tmp=tmp, deadline=START + BUDGET_S)
            print(f"gpu_check: CPU test mode (GPU_CHECK_DEVICE=cpu), trainers {','.join(trainers)}; "
                  f"torch {torch.__version__}", flush=True)
            rows += [row(c, "common", None, "CPU") for c in CHECKS[:4]]
        else:
            dev = torch.device("cuda", torch.cuda.current_device())
            try:  # native bf16 only, as common.setup_device decides (emulated bf16 on a T4 is slower than fp16)
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # torch < 2.5: no such argument, native support only
                bf16 = torch.cuda.is_bf16_supported()
            props = torch.cuda.get_device_properties(dev)
            gb = props.total_memory / 2**30
            ctx = Ctx(device="cuda", cwd=ROOT, tmp=tmp, deadline=START + BUDGET_S,
                      expect_precision="bf16" if bf16 else "fp16", tf32=props.major >= 8,
                      gpus=torch.cuda.device_count())
            print(f"gpu_check: {props.name}, {gb:.0f} GB, capability {props.major}.{props.minor}, {ctx.gpus} GPU(s); "
                  f"torch {torch.__version__}, CUDA {torch.version.cuda}; auto precision {ctx.expect_precision}",
                  flush=True)
            rows += in_process_checks(dev, tmp)
        chains = [(trainer_chain, t) for t in trainers] + [(torchrun_chain, None)]
        # chains at once: each run holds a CUDA context (~0.5 GB) and a small model; one chain per 12 GB, at least 2
        workers = min(len(chains), 1 if cpu else max(2, int(gb // 12)))
        ctx.threads = max(1, (os.cpu_count() or 2) // workers) if workers > 1 else 0
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(fn, ctx, t) if t else pool.submit(fn, ctx) for fn, t in chains]
            for j in jobs:
                rows += j.result()
    failed = print_table(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
