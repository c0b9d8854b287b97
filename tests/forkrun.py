"""A fork server for the tests' `run()` (conftest.py): each trainer run forks from one process that has
already paid for the imports every run pays (torch, numpy, psutil, tqdm, and the compiler stack that torch 2.13
imports when the first AdamW is built: ~3.3 CPU s a run out of a quick run's 5-10), then runs the real script
as `python SCRIPT ARGS` would: a new process, its own cwd, environment, argv, sys.path[0], stdin /dev/null,
stdout and stderr into files, `__main__` the script, exit code and atexit handlers as on a normal exit. Nothing
of the repository is imported here, so what a run imports (download.py, ...) is still its own doing.

Protocol: one JSON request per line on stdin {"script", "args", "cwd", "env", "out", "err", "timeout"}; one
JSON reply per line on stdout {"code"} (or {"timeout": true} after killing a run that overran).
Off with LEAN_TEST_FORK=0 (conftest.py then starts a fresh interpreter per run, as before)."""
import json
import os
import runpy
import signal
import sys
import time

import numpy
import psutil
import torch
import tqdm

PRELOADED = numpy, psutil, torch, tqdm  # what every trainer imports

torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # its first use imports dynamo and sympy


def child(req):
    """In the forked process: become `python script args` and run it; SystemExit ends the interpreter."""
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, req["out"]), (2, req["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), target)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="backslashreplace")
    sys.argv = [req["script"], *req["args"]]
    sys.path[0] = os.path.dirname(req["script"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runpy.run_path(req["script"], run_name="__main__")
    raise SystemExit(0)


def serve():
    """Requests in, one forked run each, exit codes out; returns in the child (which then runs the script)."""
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        deadline, reply = time.time() + req["timeout"], None
        while reply is None:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                reply = {"code": os.waitstatus_to_exitcode(status)}
            elif time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                reply = {"timeout": True}
            else:
                time.sleep(0.01)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    raise SystemExit(0)


if __name__ == "__main__":
    child(serve())
