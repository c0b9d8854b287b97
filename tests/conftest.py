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


_server = {}


def forked(cmd, cwd, env, timeout):
    """cmd run by tests/forkrun.py, one per test process, started at its first use: a fork of a process that
    imported torch once (~3 CPU s a run less). Returns a CompletedProcess like subprocess.run's."""
    import tempfile
    if "proc" not in _server:
        _server["proc"] = subprocess.Popen([sys.executable, str(REPO / "tests" / "forkrun.py")], env=env,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc = _server["proc"]
    with tempfile.TemporaryDirectory() as d:
        req = {"script": cmd[1], "args": cmd[2:], "cwd": str(cwd), "env": env, "timeout": timeout,
               "out": os.path.join(d, "out"), "err": os.path.join(d, "err")}
        proc.stdin.write(json.dumps(req) + "\n")
        proc.stdin.flush()
        reply = json.loads(proc.stdout.readline())
        out, err = (Path(req[k]).read_text(errors="replace") for k in ("out", "err"))
    if reply.get("timeout"):
        raise subprocess.TimeoutExpired(cmd, timeout, out, err)
    return subprocess.CompletedProcess(cmd, reply["code"], out, err)


def run(script, *args, cwd, timeout=300, check=None):
    """Run `python <repo>/<script> args` in cwd; returns CompletedProcess (text). Forked from tests/forkrun.py
    unless LEAN_TEST_FORK=0 (then a fresh interpreter, as a user's shell starts)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    if os.environ.get("LEAN_TEST_FORK", "1") != "0" and hasattr(os, "fork"):
        p = forked(cmd, cwd, env, timeout)
    else:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
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


# ./run.sh test runs each file on one worker (`--dist loadfile`), so that a module-scoped fixture (a trained run
# that several tests read) is built once, not once per worker; these files, the longest (`--durations=0`), start
# first, so that none of them is left running alone at the end
SLOW_FIRST = ["test_sft.py", "test_asr.py", "test_first_run.py", "test_lm.py", "test_ddp.py", "test_golden_losses.py",
              "test_gru.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


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
