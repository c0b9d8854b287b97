"""Shared helpers: tests run the real scripts in subprocesses, on CPU, with tiny data."""
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(script, *args, cwd, timeout=300, check=None):
    """Run `python <repo>/<script> args` in cwd; returns CompletedProcess (text)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p


def call(script, *args, cwd):
    """`python <script> args` in this process, for the bad-input tables: the exit code and what
    it printed, through the same common.run_main, without a new interpreter (a trainer's start
    costs ~3 s of imports; these tables hold ~60 cases). Returns a CompletedProcess like run."""
    import contextlib
    import importlib
    import io
    import common
    main = importlib.import_module(Path(script).stem).main
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                common.run_main(lambda: main(list(map(str, args))))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def popen(script, *args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, timeout=120, what="condition"):
    """Poll pred() every 50 ms until it holds; an AssertionError after `timeout` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def tree_digest(d, skip=None):
    """One hash of every file (path and bytes) under d, but `skip`: "nothing saved was touched"."""
    h = hashlib.sha256()
    for f in sorted(Path(d).rglob("*")):
        if f.is_file() and f.name != skip:
            h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


def read_json(path):
    return json.loads(Path(path).read_text())


def assert_plan_near_peak(summary):
    """The issue's bar for the memory plan: within 25 % of the measured peak of live tensors."""
    plan, peak = summary["memory_plan_mb"], summary["peak_tensor_mb"]
    assert set(plan) >= {"weights", "gradients", "optimizer", "activations", "total"}, plan
    assert peak and abs(plan["total"] / peak - 1) <= 0.25, (plan, peak)
    assert summary["optim"] == "adamw" and summary["optimizer_state_mb"] == pytest.approx(plan["optimizer"], abs=0.1)


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l]


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def torchrun_popen(script, *args, cwd, nproc=2):
    """`python -m torch.distributed.run --standalone --nproc_per_node=N <script> args` on CPU, one
    thread a rank, in its own session so that os.killpg ends torchrun and every rank together."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", str(REPO / script), *map(str, args)],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def torchrun(script, *args, cwd, nproc=2, check=0, timeout=240):
    """torchrun_popen to the end: its output (stdout and stderr); on a hang the whole group is
    killed, not left behind."""
    import signal
    proc = torchrun_popen(script, *args, cwd=cwd, nproc=nproc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    if check is not None and proc.returncode != check:
        print(out)  # pytest shows a failed test's stdout whole; an assertion message it cuts to 8 lines
    assert check is None or proc.returncode == check, out[-5000:]
    return out
