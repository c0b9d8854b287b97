"""Every trainer under torchrun (2 gloo ranks x 1 thread on CPU): the same losses as one process
at the same global batch, a kill -9 of the whole group resumed bit for bit, another process
count refused. train_lm.py's own DDP test is in test_lm.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, call, metrics, read_json, run, torchrun, torchrun_popen, wait_for

# (script, flags for both, flags for 1 process, flags for each of 2 ranks): the global batch is
# the same. Dropout 0: each rank draws its own masks (ddp.Ranks.seed_step), so with dropout two
# processes follow one in distribution, not number for number.
RUNS = {
    # 275 train queries, global batch 8: each epoch ends on 3 queries, split 1 + 2 between the
    # ranks, with different target counts (train_step's norm keeps that exact)
    "gru": ("train_gru.py", ["--quick", "--dataset-size", "305", "--epochs", "1", "--dropout", "0",
                             "--grad-accum", "2", "--log-every", "1", "--eval-every", "10"],
            ["--batch-size", "4"], ["--batch-size", "2"]),
    "classifier": ("train_classifier.py", ["--quick", "--max-steps", "6", "--grad-accum", "2", "--log-every", "1",
                                           "--eval-every", "3"], ["--batch-size", "8"], ["--batch-size", "4"]),
    # one process: micro-batches of 2, accumulated twice; two: one micro-batch of 2 each. The same
    # micro-batches, so the same BatchNorm batch statistics
    "asr": ("train_asr.py", ["--quick", "--dataset-size", "64", "--max-steps", "6", "--dropout", "0",
                             "--no-spec-augment", "--log-every", "1", "--eval-every", "3"],
            ["--batch-size", "2", "--grad-accum", "2"], ["--batch-size", "2", "--grad-accum", "1"]),
    # the ranks' answers differ in length: the global answer-token count keeps it exact (without
    # it the losses moved by 4e-5)
    "sft": ("train_sft.py", ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "160", "--data",
                             "few.jsonl", "--max-steps", "6", "--grad-accum", "2", "--log-every", "1",
                             "--eval-every", "3", "--precision", "fp32"], ["--batch-size", "4"], ["--batch-size", "2"]),
}


def close(one, two, rel, skip=()):  # the issue asks for 1e-4; the runs agree to 1e-5
    assert [sorted(r) for r in one] == [sorted(r) for r in two] and one
    for a, b in zip(one, two):
        for k in a:
            if k not in skip:
                assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), (k, a, b)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_processes_follow_one_process_and_refuse_another_count(tmp, name):
    script, both, one_flags, rank_flags = RUNS[name]
    if name == "sft":
        import train_sft
        (tmp / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))
    run(script, *both, *one_flags, "--device", "cpu", "--out", "one", cwd=tmp, check=0)
    torchrun(script, *both, *rank_flags, "--device", "cpu", "--out", "two", cwd=tmp)
    one, two = metrics(tmp / "one"), metrics(tmp / "two")
    train = lambda recs: [r for r in recs if "loss" in r and "val_loss" not in r]  # noqa: E731
    val = lambda recs: [r for r in recs if "val_loss" in r]  # noqa: E731
    # padding: rank 0's share of the batch. ASR's validation: DDP keeps rank 0's BatchNorm running
    # statistics (it broadcasts rank 0's buffers), one process updates them with every micro-batch
    assert len(train(one)) >= 6
    close(train(one), train(two), 1e-5, skip=("padding", "ms_per_step", "tokens_per_s", "mfu", "peak_mem_mb"))
    close(val(one), val(two), 1e-3 if name == "asr" else 1e-4)
    s = read_json(tmp / "two" / "summary.json")
    assert s["world_size"] == 2 and s["global_batch"] == read_json(tmp / "one" / "summary.json")["global_batch"]
    assert read_json(tmp / "two" / "args.json")["chosen"]["world_size"] == 2
    # one process resuming a 2-process run: one line, exit 2, nothing written
    p = call(script, *both, *rank_flags, "--device", "cpu", "--out", "two", cwd=tmp)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "was trained on 2 process(es), this is 1" in p.stderr, p.stderr


def step_reached(status_path, n):
    try:
        return read_json(status_path).get("step", 0) >= n
    except (OSError, ValueError):
        return False


def test_kill_9_of_the_torchrun_group_then_resume_reproduces_the_run(tmp):
    """train_gru.py with dropout (each rank's masks come from (seed, step, rank), so a resume
    draws the same ones)."""
    flags = ["--quick", "--dataset-size", "200", "--max-steps", "20", "--batch-size", "4", "--grad-accum", "1", "--save-every", "4",
             "--log-every", "2", "--eval-every", "10", "--device", "cpu"]
    torchrun("train_gru.py", *flags, "--out", "ref", cwd=tmp)
    proc = torchrun_popen("train_gru.py", *flags, "--out", "killed", cwd=tmp)
    try:
        wait_for(lambda: step_reached(tmp / "killed" / "status.json", 6), what="step 6")
    finally:  # torchrun and both ranks at once (torchrun starts each rank in its own session)
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        proc.wait()
        psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
    out = torchrun("train_gru.py", *flags, "--out", "killed", cwd=tmp)
    assert "resumed from" in out
    assert metrics(tmp / "killed") == metrics(tmp / "ref")
    ref, got = (torch.load(sorted((tmp / d / "checkpoints").glob("ckpt_step*.pt"))[-1], weights_only=True)["model"]
                for d in ("ref", "killed"))
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_start_nproc_2_is_one_run_in_status_and_stop_ends_every_rank(tmp):
    """memory_optimizer.py start --nproc 2 (run.sh start, start_training.bat start): torchrun,
    detached; status.json names the rank-0 worker; stop signals it and both ranks stop."""
    mo = [sys.executable, str(REPO / "memory_optimizer.py")]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    r = subprocess.run([*mo, "start", "gru", "--nproc", "2", "--quick", "--dataset-size", "200", "--batch-size", "4",
                        "--grad-accum", "1", "--epochs", "1000", "--device", "cpu", "--out", "runs/d"],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp / "runs" / "d"
    wait_for(lambda: step_reached(out / "status.json", 3), what="step 3")
    st = read_json(out / "status.json")
    ranks = [p for p in psutil.process_iter(["cmdline"]) if "train_gru.py" in " ".join(p.info["cmdline"] or [])
             and str(out.name) in " ".join(p.info["cmdline"] or []) and "-u" in (p.info["cmdline"] or [])]
    assert st["pid"] in [p.pid for p in ranks] and len(ranks) == 2
    s = subprocess.run([*mo, "status"], cwd=tmp, env=env, capture_output=True, text=True, timeout=60)
    assert s.stdout.count("running") == 1, s.stdout
    s = subprocess.run([*mo, "stop", "runs/d"], cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    assert s.returncode == 0, s.stdout + s.stderr
    psutil.wait_procs(ranks, timeout=60)
    assert not any(p.is_running() for p in ranks)
    final = read_json(out / "status.json")
    assert final["state"] == "stopped" and Path(final["last_checkpoint"]).exists()


EXIT_SCRIPT = """
import atexit, sys
sys.path.insert(0, {repo!r})
import common
atexit.register(lambda: print("teardown ran"))
def main():
    print("written", end="")  # left in the buffer: run_main must flush it
    if sys.argv[1] == "mistake":
        raise common.UserError("--data x.csv: no such file")
    return 3
common.run_main(main)
"""


@pytest.mark.parametrize("case", ["ok", "mistake"])
def test_a_torchrun_rank_exits_with_its_code_and_its_output_but_no_teardown(tmp, case):
    # common.run_main: under torchrun (WORLD_SIZE > 1) the interpreter's teardown is skipped,
    # where gloo's worker thread aborted rank 1 (docs/run-contract.md, "Exit")
    (tmp / "rank.py").write_text(EXIT_SCRIPT.format(repo=str(REPO)))
    for world, teardown in (("2", False), ("1", True)):
        p = subprocess.run([sys.executable, "rank.py", case], cwd=tmp, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, WORLD_SIZE=world))
        assert p.returncode == (3 if case == "ok" else 2), (world, p.returncode, p.stderr)
        assert p.stdout.startswith("written") and ("teardown ran" in p.stdout) == teardown, (world, p.stdout)
        if case == "mistake":
            assert p.stderr == "error: --data x.csv: no such file\n", p.stderr
