"""gpu_check.py -- one command that checks every trainer's CUDA paths, in at most 8 minutes.

    python benchmarks/gpu_check.py       # any CUDA GPU (H200, A100, T4, ...); a CPU-only machine: one line, exit 0

In-process, on a tiny model: common.train_step recovers from a CUDA out-of-memory error by
halving the micro-batch (same effective batch, same gradient); fp16's GradScaler skips a step with
inf gradients and halves its scale; common.setup_device turns TF32 on (Ampere and newer); NCCL
all-reduces and trains one DDP step in a one-process group. Then each trainer runs a few --quick
steps in subprocesses: bf16 (with --batch-size auto: the batch probe, the memory plan against
torch.cuda.max_memory_allocated, TF32 in args.json), fp16 with GradScaler, --optim adamw8bit, an
explicit batch too big for a small --gpu-memory (out-of-memory recovery), and train_gru.py under
torchrun. One table at the end: check | trainer | result | figure. Exit 1 if any check failed.
"""

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TRAINERS = ["gru", "classifier", "asr", "lm", "sft"]
BUDGET_S = 440  # all subprocess runs together; with startup and the in-process checks, under 8 minutes
RUN_TIMEOUT_S = 120  # one run; a quick run of the slowest trainer (sft) takes ~20 s on a GPU
# the most samples a step can hold on each trainer's --quick data (about its train split): the
# out-of-memory run asks for this batch
QUICK_MAX_BATCH = {"gru": 4096, "classifier": 512, "asr": 512, "lm": 4096, "sft": 2048}
START = time.time()


def add(rows, check, trainer, ok, figure):
    """One table row; ok is True, False or None (n/a)."""
    rows.append((check, trainer, {True: "ok", False: "FAIL", None: "n/a"}[ok], figure))


def say(msg):
    print(f"gpu_check: {msg}", file=sys.stderr, flush=True)  # progress; the table goes to stdout


# -----------------------------------------------------------------------------
# in-process checks of common.py

def check_oom_recovery(rows, common, dev):
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
    ok = bool(logs) and "micro-batch halved" in logs[0] and n == 16384 and same and math.isclose(loss, ref_loss, rel_tol=1e-4)
    add(rows, "OOM recovery (train_step)", "common", ok,
        f"16384 under 0.5 GB: {len(logs)} halvings to {used}, {n} samples, same step as uncapped: {same}")


def check_scaler_skip(rows, common, dev):
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
    add(rows, "fp16 GradScaler inf step", "common", skipped and moved,
        f"inf step skipped: {skipped}, scale 1024 -> {scaler.get_scale():g}; next step trained: {moved}")


def check_tf32(rows, common, dev):
    args = argparse.Namespace(device="cuda", precision="auto", gpu_memory=None)
    common.setup_device(args)
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        add(rows, "TF32 (setup_device)", "common", None, f"pre-Ampere (capability {major}.{minor})")
        return
    on = torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    add(rows, "TF32 (setup_device)", "common", on, f"capability {major}.{minor}: matmul and cuDNN TF32 {on}")


def check_nccl(rows, common, dev, tmp):
    """A one-process NCCL group: all-reduce, then one DDP step through train_step's no_sync."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_nccl_available()):
        add(rows, "NCCL DDP (in-process)", "common", False, "this torch build has no NCCL")
        return
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
        add(rows, "NCCL DDP (in-process)", "common", ok, f"NCCL {nccl}: all_reduce, DDP step over 2 micro-batches")
    finally:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# the trainers, in subprocesses

def run(tmp, name, cmd, deadline):
    """Run one trainer command (its --out is tmp/name); return what it left: rc, summary, args, log."""
    left = deadline - time.time()
    if left < 15:
        return {"rc": None, "why": "not run: the 8-minute budget is spent"}
    out, config = tmp / name, tmp / "empty_config.json"
    # a config that sets nothing: a local optimal_config.json must not change what is checked
    config.write_text(json.dumps({"trainers": {t: {} for t in TRAINERS}}))
    t0 = time.time()
    try:
        p = subprocess.run(cmd + ["--out", str(out), "--config", str(config)], cwd=ROOT,
                           capture_output=True, text=True, timeout=min(RUN_TIMEOUT_S, left))
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        rc, text = None, ""
    secs = time.time() - t0
    r = {"rc": rc, "secs": secs, "text": text, "why": f"rc {rc}" if rc is not None else f"timed out after {secs:.0f}s"}
    for key in ("summary", "args"):
        f = out / f"{key}.json"
        r[key] = json.loads(f.read_text()) if f.is_file() else {}
    r["log"] = (out / "train.log").read_text(errors="replace") if (out / "train.log").is_file() else ""
    if rc not in (0, None):  # where it broke: the innermost frame in this repo's files, and the error line
        frames = re.findall(r'File "[^"]*?((?:common|train_\w+)\.py)", line (\d+), in (\w+)', text)
        errors = [l for l in text.splitlines() if re.match(r"(error:|[\w.]+(Error|Exception):)", l)]
        r["why"] += (f", in {frames[-1][0]}:{frames[-1][1]} {frames[-1][2]}" if frames else "") + (
            f": {errors[-1][:90]}" if errors else "")
    say(f"{name}: {r['why']} ({secs:.0f}s)")
    return r


def quick(trainer, *flags):
    return [sys.executable, f"train_{trainer}.py", "--quick", "--device", "cuda", "--max-steps", "3", *flags]


def done(r, precision):
    """(ok, figure) for a run that should finish in `precision` (summary.json's, else args.json's)."""
    s = r.get("summary", {})
    if r["rc"] != 0:
        return False, r["why"]
    got = s.get("precision") or r["args"].get("chosen", {}).get("precision")
    ok = got == precision and isinstance(s.get("value"), (int, float)) and math.isfinite(s["value"])
    return ok, f"{s.get('metric')} {s.get('value')}, {got}, {r['secs']:.0f}s"


def check_trainer(rows, tmp, t, prec, deadline):
    """bf16 (or fp16 where bf16 is missing) with the probe; then fp16, adamw8bit and out-of-memory runs."""
    main = run(tmp, f"{t}-{prec}", quick(t, "--precision", prec, "--batch-size", "auto"), deadline)
    ok, fig = done(main, prec)
    add(rows, prec, t, ok, fig)
    if prec == "fp16":
        add(rows, "bf16", t, None, "GPU has no native bf16")
    s, chosen = main["summary"], main["args"].get("chosen", {})
    why = chosen.get("why", {})
    add(rows, "batch probe", t, ok and "probe" in why.get("batch", ""),
        f"micro {chosen.get('micro_batch')} x {chosen.get('grad_accum')}: {why.get('batch', main['why'])}"[:100])
    plan, peak = (s.get("memory_plan_mb") or {}).get("total"), s.get("peak_tensor_mb")
    if plan and peak:
        add(rows, "plan vs max_memory_allocated", t, 0.75 <= peak / plan <= 1.25,
            f"plan {plan} MB, peak {peak} MB ({peak / plan:.2f}x, {peak - plan:+.1f} MB)")
    else:
        add(rows, "plan vs max_memory_allocated", t, False, f"summary has no memory_plan_mb/peak_tensor_mb ({main['why']})")
    major = torch.cuda.get_device_capability()[0]
    add(rows, "TF32", t, "TF32 on" in why.get("precision", "") if major >= 8 else None,
        why.get("precision", main["why"]) if major >= 8 else "pre-Ampere")
    if not ok:
        for check in (["fp16"] if prec == "bf16" else []) + ["adamw8bit", "OOM recovery"]:
            add(rows, check, t, None, f"the {prec} run failed")
        return
    same_batch = ["--batch-size", str(chosen["micro_batch"]), "--grad-accum", str(chosen["grad_accum"])]
    if prec == "bf16":
        add(rows, "fp16", t, *done(run(tmp, f"{t}-fp16", quick(t, "--precision", "fp16", *same_batch), deadline), "fp16"))

    r = run(tmp, f"{t}-8bit", quick(t, "--precision", prec, "--optim", "adamw8bit", *same_batch), deadline)
    ok8, fig8 = done(r, prec)
    full, small = s.get("optimizer_state_mb"), r["summary"].get("optimizer_state_mb")
    if ok8 and full and small is not None:
        ok8, fig8 = small / full <= 0.3, (f"state {small} vs {full} MB ({small / full:.2f}x); "
                                          f"{s['metric']} {r['summary']['value']} vs {s['value']}")
    elif ok8:
        ok8, fig8 = False, "summary has no optimizer_state_mb"
    add(rows, "adamw8bit", t, ok8, fig8)

    # out of memory: the biggest batch the quick data holds, under a cap a third of what its step
    # needs by the bf16 run's measured peak per sample (weights, gradients and optimizer state apart)
    fixed = sum((s.get("memory_plan_mb") or {}).get(k, 0) for k in ("weights", "gradients", "optimizer"))
    per_sample = ((peak or 0) - fixed) / chosen["micro_batch"]
    big = QUICK_MAX_BATCH[t]
    need_gb = (fixed + per_sample * big) / 1024
    if not peak:
        add(rows, "OOM recovery", t, None, "no peak_tensor_mb to size the run by")
        return
    if need_gb < 0.375:
        add(rows, "OOM recovery", t, None, f"batch {big} needs only {need_gb * 1024:.0f} MB: nothing to overflow")
        return
    cap = round(max(0.125, need_gb / 3), 3)
    r = run(tmp, f"{t}-oom", quick(t, "--precision", prec, "--batch-size", str(big), "--grad-accum", "1",
                                   "--gpu-memory", str(cap)), deadline)
    halved = re.findall(r"micro-batch halved to (\d+)", r["log"])
    eff = r["summary"].get("effective_batch", r["summary"].get("global_batch"))
    add(rows, "OOM recovery", t, r["rc"] == 0 and bool(halved) and eff == big,
        f"batch {big} (~{need_gb:.2f} GB) under --gpu-memory {cap:g}: "
        + (r["why"] if r["rc"] != 0 else f"halved to {halved[-1]}, effective batch {eff}" if halved
           else f"no halving in train.log, effective batch {eff}")[:120])


def check_torchrun(rows, tmp, deadline):
    n = min(2, torch.cuda.device_count())  # NCCL refuses two ranks on one GPU
    r = run(tmp, "gru-torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  str(n), "train_gru.py", "--quick", "--device", "cuda", "--max-steps", "5"], deadline)
    world = r["summary"].get("world_size")
    add(rows, "torchrun DDP", "gru", r["rc"] == 0 and world == n,
        f"{n} process(es): world_size {world}, {r['why']}" + (" (NCCL group only for world > 1)" if n == 1 else ""))


# -----------------------------------------------------------------------------

def main():
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU build"
        print(f"gpu_check: no CUDA device visible to PyTorch (torch {torch.__version__}, {build}); nothing to check")
        return 0
    sys.path.insert(0, str(ROOT))
    import common

    dev = torch.device("cuda", torch.cuda.current_device())
    try:  # native bf16 only, as common.setup_device decides (emulated bf16 on a T4 is slower than fp16)
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.5: no such argument, native support only
        bf16 = torch.cuda.is_bf16_supported()
    prec = "bf16" if bf16 else "fp16"
    props = torch.cuda.get_device_properties(dev)
    print(f"gpu_check: {props.name}, {props.total_memory / 2**30:.0f} GB, capability {props.major}.{props.minor}, "
          f"{torch.cuda.device_count()} GPU(s); torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"trainers run in {prec}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp = Path(tmp)
        for check in (check_oom_recovery, check_scaler_skip, check_tf32):  # TF32 last: the OOM check compares fp32 steps
            try:
                check(rows, common, dev)
            except Exception as e:  # one broken check must not hide the others' results
                add(rows, check.__name__, "common", False, f"{type(e).__name__}: {e}"[:120])
        try:
            check_nccl(rows, common, dev, tmp)
        except Exception as e:
            add(rows, "NCCL DDP (in-process)", "common", False, f"{type(e).__name__}: {e}"[:120])
        deadline = START + BUDGET_S
        check_torchrun(rows, tmp, deadline)
        for t in TRAINERS:
            check_trainer(rows, tmp, t, prec, deadline)

    widths = [max(len(r[i]) for r in rows + [("check", "trainer", "result", "figure")]) for i in range(3)]
    print(f"{'check':<{widths[0]}} | {'trainer':<{widths[1]}} | {'result':<{widths[2]}} | figure")
    print("-" * (sum(widths) + 9) + "-+-" + "-" * 40)
    for r in rows:
        print(f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:<{widths[2]}} | {r[3]}")
    failed = sum(r[2] == "FAIL" for r in rows)
    print(f"gpu_check: {len(rows)} checks, {failed} failed, {time.time() - START:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
