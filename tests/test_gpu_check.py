"""benchmarks/gpu_check.py. Without CUDA: one line that says so, exit 0, nothing else. The rows themselves run
on a GPU only in earnest, so here their functions run against the CPU (gpu_check.Ctx(device="cpu"): the same
commands with --device cpu) on gru and classifier: each subprocess's summary.json, args.json, train.log and
checkpoints are parsed as on a GPU, so a renamed field or a changed log line fails here first. The rows that need
CUDA (fp16, --gpu-memory) must say "not run: CPU"; the glue that runs a trainer's rows is checked with stub rows."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is visible: gpu_check.py would run its real checks")
def test_gpu_check_without_cuda_is_one_line_and_exit_0():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device visible to PyTorch"), p.stdout
    # stderr is not checked: a CUDA build of torch on a machine without a driver warns there itself
    assert lines[0].endswith("nothing to check"), p.stdout


def test_cpu_mode_prints_the_table_and_exits_0():
    """GPU_CHECK_DEVICE=cpu with no trainer: the table with the in-process and torchrun rows, all "not run: CPU"."""
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_TRAINERS="none")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert [c.strip() for c in lines[1].split("|")] == ["check", "trainer", "result", "figure"], lines[1]
    rows = [l.split(" | ") for l in lines[3:-1]]
    assert [r[0].strip() for r in rows] == gpu_check.CHECKS[:4] + ["torchrun, 2 NCCL ranks"]
    assert all(r[2].strip() == "not run" and r[3] == "CPU" for r in rows), rows
    assert lines[-1].startswith("gpu_check: 5 rows, 0 FAIL, 5 not run"), lines[-1]


def cpu_ctx(tmp):
    (tmp / "empty_config.json").write_text(json.dumps({"trainers": {t: {} for t in gpu_check.TRAINERS}}))
    return gpu_check.Ctx(device="cpu", cwd=tmp, tmp=tmp, deadline=time.time() + 600)


def test_gru_default_inference_and_resource_efficient_rows_on_cpu(tmp_path, monkeypatch):
    """The default run and its inference command, --resource-efficient; fp16 and --gpu-memory are CUDA-only."""
    monkeypatch.setattr(gpu_check, "DEFAULT_STEPS", 3)
    ctx = cpu_ctx(tmp_path)
    default, r = gpu_check.row_default(ctx, "gru")
    assert r[:3] == ("default preset, auto", "gru", "pass"), r
    assert re.match(r"val_ppl [\d.]+, (fp32|bf16), \d+s; batch \d+ x \d+ \(start \d+ from .*probe", r[3]), r
    r = gpu_check.row_infer(ctx, "gru", default)
    assert r[2] == "pass" and r[3].startswith("--suggest: 'red run"), r
    r = gpu_check.row_re(ctx, "gru", {"--resource-efficient"})
    assert r[2] == "pass" and "halved by --resource-efficient" in r[3], r
    assert gpu_check.row_fp16(ctx, "gru")[2:] == ("not run", "CPU (fp16's GradScaler needs CUDA)")
    assert gpu_check.row_oom(ctx, "gru")[2:] == ("not run", "CPU (--gpu-memory caps CUDA memory)")


def test_gru_resume_and_adamw8bit_rows_on_cpu(tmp_path):
    """kill -9 and resume (bit-exact on a CPU), then AdamW8bit's state against the uninterrupted run's AdamW."""
    ctx = cpu_ctx(tmp_path)
    ref, r = gpu_check.row_resume(ctx, "gru")
    assert r[2] == "pass", r
    assert re.match(r"killed at step (4|8)'s checkpoint, resumed from step (4|8); final weights max \|diff\| 0 "
                    r"\(bit-exact required: two fresh runs agree bit for bit at step 4\)", r[3]), r
    # the fp16 row reads the GradScaler state of a checkpoint: on a CPU it is there, empty (the scaler is off)
    ckpts = gpu_check.checkpoints(ref["out"])
    assert sorted(ckpts) == [4, 8, 12] and gpu_check.load(ckpts[12])["scaler"] == {}
    r = gpu_check.row_8bit(ctx, "gru", ref)
    assert r[2] == "pass" and re.match(r"state [\d.]+ MB vs AdamW [\d.]+ MB = 0\.2\d", r[3]), r


def test_classifier_rows_on_cpu(tmp_path):
    """--help's flags, plan vs peak on items of one length (--measure-peak on a CPU), --grad-checkpointing on
    --preset small against its --plan, and a flag the trainer lacks."""
    ctx = cpu_ctx(tmp_path)
    flags = gpu_check.help_flags(ctx, "classifier")
    assert {"--grad-checkpointing", "--resource-efficient", "--optim"} <= flags and "--compile" not in flags
    assert gpu_check.row_compile(ctx, "classifier", flags)[2:] == ("not run", "no such flag")
    r = gpu_check.row_plan(ctx, "classifier", None)
    assert r[2] == "pass" and re.match(r"plan [\d.]+ MB / peak [\d.]+ MB = [\d.]+ \(band 0.75-1.25", r[3]), r
    r = gpu_check.row_gc(ctx, "classifier", flags)
    assert r[2] == "pass" and re.match(r"activations planned [\d.]+ MB vs [\d.]+ without \(--preset small\)", r[3]), r


@pytest.mark.parametrize("trainer,flag", [("asr", "--train-manifest"), ("sft", "--data"), ("gru", "--data")])
def test_uniform_data_is_read_by_the_trainer(trainer, flag, tmp_path):
    """The plan row's data (every item one length) passes the trainer's own reader: --plan prints the plan."""
    ctx = cpu_ctx(tmp_path)
    args = gpu_check.uniform_data(ctx, trainer)
    assert args[0] == flag
    # the default preset, as row_plan runs it; fp32 and a fixed batch: no timing of bf16, no probe
    cmd = gpu_check.train(ctx, trainer, *args, "--precision", "fp32", "--batch-size", "2", "--plan", quick=False)
    r = gpu_check.spawn(ctx, "plan", cmd, out="plan")
    assert r["rc"] == 0, r["text"][-2000:]
    plan = gpu_check.plan_of(r)
    assert plan["total"] > 0 and plan["activations"] > 0, plan


def test_the_halving_line_is_the_one_train_step_logs():
    """row_oom looks for "micro-batch halved to N" in the output: common.train_step's own words."""
    import common
    model = torch.nn.Linear(4, 1)
    calls = []

    def loss_fn(m, b):
        calls.append(len(b["x"]))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return m(b["x"]).sum(), len(b["x"])

    logs = []
    common.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False),
                      {"x": torch.randn(8, 4)}, loss_fn, 8, clip=0.0, device=torch.device("cpu"), amp_dtype=None,
                      log=logs.append)
    assert re.findall(r"micro-batch halved to (\d+)", "\n".join(logs)) == ["4"], logs


def test_a_row_that_raises_is_a_fail_and_the_chain_goes_on(tmp_path, monkeypatch):
    """trainer_chain: every row in order; a gpu_check bug in one row (a KeyError) FAILs that row only."""
    ctx = cpu_ctx(tmp_path)
    stub = {"rc": 0, "summary": {}, "why": "rc 0"}
    monkeypatch.setattr(gpu_check, "help_flags", lambda ctx, t: {"--compile"})
    monkeypatch.setattr(gpu_check, "row_default", lambda ctx, t: (stub, gpu_check.row("default preset, auto", t,
                                                                                      True, "ok")))

    def broken(ctx, t):
        raise KeyError("peak_tensor_mb")
    monkeypatch.setattr(gpu_check, "row_resume", broken)
    for name in ("row_infer", "row_fp16", "row_plan", "row_oom", "row_8bit", "row_gc", "row_re", "row_compile"):
        check = {"row_infer": "inference command", "row_fp16": "default preset, fp16",
                 "row_plan": "plan vs peak, worst batch", "row_oom": "--gpu-memory OOM halving",
                 "row_8bit": "--optim adamw8bit", "row_gc": "--grad-checkpointing", "row_re": "--resource-efficient",
                 "row_compile": "--compile"}[name]
        monkeypatch.setattr(gpu_check, name, lambda ctx, t, *a, check=check: gpu_check.row(check, t, True, "ok"))
    rows = gpu_check.trainer_chain(ctx, "lm")
    assert [r[0] for r in rows] == ["default preset, auto", "inference command", "kill -9 and resume",
                                    "default preset, fp16", "plan vs peak, worst batch", "--gpu-memory OOM halving",
                                    "--optim adamw8bit", "--grad-checkpointing", "--resource-efficient", "--compile"]
    assert [r[2] for r in rows].count("FAIL") == 1
    assert rows[2] == ("kill -9 and resume", "lm", "FAIL", "gpu_check error: KeyError: 'peak_tensor_mb'")
