"""Tests for memory_optimizer.py: the real script in subprocesses on CPU (profile, config,
optimize, monitor, the background-run manager start/status/monitor RUN/stop, bad input), plus
unit tests of recommend() on made-up machines and of the running-runs summary. About 40 s, most
of it torch's import in each subprocess and one short background GRU run.

    python -m pytest -q tests/test_memory_optimizer.py
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import memory_optimizer as mo  # noqa: E402
from common import TRAINERS, UserError, table_batch_size  # noqa: E402
from conftest import call, tree_digest, wait_for  # noqa: E402

PROFILE_KEYS = {"cpu_model", "cpu_cores_physical", "cpu_cores_logical", "ram_total_gb",
                "ram_available_gb", "cuda_available", "gpu_name", "gpu_count", "gpu_total_gb",
                "gpu_free_gb", "gpu_capability", "bf16_supported", "tf32_supported", "disk_free_gb",
                "os", "python", "torch", "cpu_bf16_units", "matmul_peak"}


def run(cwd, *args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "memory_optimizer.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def check_entries(trainers):
    """Every setting is {"value": ..., "reason": "<non-empty sentence>"}; batch_size and
    grad_accum (and the asr preset: --quick keeps its tiny model) also carry the quick column
    ("quick_value", taken by --quick runs), and so may the LM's seq_len (on CPU: train_lm.py
    --quick's own context, 64)."""
    for name, settings in trainers.items():
        for key, entry in settings.items():
            extra = {"quick_value"} if key in ("batch_size", "grad_accum") or (name, key) == ("asr", "preset") \
                else set()
            if (name, key) in (("lm", "seq_len"), ("sft", "seq_len")) and "quick_value" in entry:
                extra = {"quick_value"}
            assert set(entry) == {"value", "reason"} | extra, (name, key, entry)
            assert isinstance(entry["reason"], str) and len(entry["reason"]) > 10, (name, key)


# -----------------------------------------------------------------------------
# profile

def test_profile_text(capsys):
    assert mo.main(["profile"]) == 0  # in-process: the subprocess run below covers the script
    text = capsys.readouterr().out
    for label in ("RAM total", "RAM available", "CPU cores (physical)", "CPU cores (logical)",
                  "CUDA available", "torch"):
        assert label in text
    assert torch.__version__ in text
    ram_line = next(line for line in text.splitlines() if line.startswith("RAM total"))
    assert ram_line.split()[-2] == f"{psutil.virtual_memory().total / 2**30:.1f}"


def test_profile_json(tmp_path):
    r = run(tmp_path, "profile", "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert set(prof) == PROFILE_KEYS
    assert prof["cpu_cores_logical"] == psutil.cpu_count(logical=True)
    assert 1 <= prof["cpu_cores_physical"] <= prof["cpu_cores_logical"]
    assert prof["ram_total_gb"] == pytest.approx(psutil.virtual_memory().total / 2**30)
    assert 0 < prof["ram_available_gb"] <= prof["ram_total_gb"]
    assert prof["cuda_available"] == torch.cuda.is_available()
    assert prof["torch"] == torch.__version__
    if not prof["cuda_available"]:
        assert prof["gpu_name"] is None and prof["bf16_supported"] is False
    # MFU's denominator: measured here once, per precision, with the thread count it holds for
    peak = prof["matmul_peak"]
    assert peak["device"] == ("cuda" if prof["cuda_available"] else "cpu") and peak["threads"] >= 1
    assert peak["fp32_gflops"] > 1 and peak["bf16_gflops"] > 0.1


# -----------------------------------------------------------------------------
# config

def test_config_writes_every_trainer(tmp_path):
    r = run(tmp_path, "config")
    assert r.returncode == 0, r.stderr
    path = tmp_path / "optimal_config.json"  # the default --out, where the trainers look
    assert "wrote optimal_config.json" in r.stdout
    cfg = json.loads(path.read_text())
    assert set(cfg) == {"created", "machine", "trainers"}
    assert set(cfg["machine"]) == PROFILE_KEYS
    assert set(cfg["trainers"]) == set(TRAINERS)
    check_entries(cfg["trainers"])

    cuda = torch.cuda.is_available()
    free = cfg["machine"]["gpu_free_gb"]
    want_bs, _ = table_batch_size("cuda" if cuda else "cpu", False, free_gpu_gb=free)
    for name, s in cfg["trainers"].items():
        bs, accum = s["batch_size"]["value"], s["grad_accum"]["value"]
        assert bs == want_bs, name
        minimal_asr = (name, s["preset"]["value"]) == ("asr", "minimal")
        effective = mo.ASR_MINIMAL_EFFECTIVE_BATCH if minimal_asr else mo.EFFECTIVE_BATCH[name]
        assert accum == max(1, math.ceil(effective / bs)), name
        # CPU: no entry, so each trainer times fp32 against bf16 on its own step
        assert s["precision"]["value"] in ("bf16", "fp16") if cuda else "precision" not in s
        assert s["preset"]["value"]  # every trainer calls its model-size flag --preset
        assert s["batch_size"]["value"] is not None
    assert set(cfg["trainers"]["gru"]) == {"batch_size", "grad_accum", "preset"} | ({"precision"} if cuda else set())
    assert "seq_len" not in cfg["trainers"]["asr"]
    assert cfg["trainers"]["classifier"]["max_len"]["value"] == 64
    assert cfg["trainers"]["sft"] == cfg["trainers"]["lm"]  # train_lm.py --task sft read the lm section
    # the printed table has one row per (trainer, setting)
    n_rows = sum(len(s) for s in cfg["trainers"].values())
    assert sum(1 for line in r.stdout.splitlines() if line.split()[:1] and line.split()[0] in TRAINERS) == n_rows


def test_config_quick_in_process(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert mo.main(["config", "--quick", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())
    cuda = torch.cuda.is_available()
    want_bs, _ = table_batch_size("cuda" if cuda else "cpu", True,
                                  free_gpu_gb=cfg["machine"]["gpu_free_gb"])
    assert all(s["batch_size"]["value"] == want_bs for s in cfg["trainers"].values())
    assert "quick column" in cfg["trainers"]["gru"]["batch_size"]["reason"] or cuda
    assert f"wrote {out}" in capsys.readouterr().out


def test_config_is_read_by_resolve_settings(tmp_path):
    """A trainer applies an entry only when the key is one of its dests and the flag was not typed."""
    path = tmp_path / "cfg.json"
    assert mo.main(["config", "--out", str(path)]) == 0
    cfg = json.loads(path.read_text())["trainers"]["lm"]
    parser = common.make_parser("test", "lm", epochs=1, lr=1e-3, effective_batch=32)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=128, help="tokens")
    parser.add_argument("--preset", default="base", help="model size")
    logged = []
    args, sources = common.resolve_settings(parser, ["--config", str(path), "--batch-size", "3"],
                                            log=logged.append)
    assert args.batch_size == 3 and sources["batch_size"] == "flag"  # typed: the config loses
    for key in ("grad_accum", "workers", "pin_memory", "seq_len", "preset", *(["precision"] if "precision" in cfg else [])):
        assert getattr(args, key) == cfg[key]["value"], key
        assert sources[key] == "optimal_config.json", key
    assert logged and "flags override" in logged[0]


def test_config_bad_out(tmp_path):
    r = run(tmp_path, "config", "--out", "/nonexistent_dir/x.json")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--out" in lines[0], r.stderr
    assert not (tmp_path / "optimal_config.json").exists()
    with pytest.raises(UserError, match="is a folder"):
        mo.main(["config", "--out", str(tmp_path)])


# -----------------------------------------------------------------------------
# recommend(): made-up machines, no probing

def fake_profile(ram_gb, cores=8, gpu_free=None, bf16=False):
    return {"ram_total_gb": ram_gb, "cpu_cores_logical": cores, "cpu_cores_physical": cores,
            "cuda_available": gpu_free is not None, "gpu_free_gb": gpu_free, "bf16_supported": bf16}


@pytest.mark.parametrize("ram, standard, quick", [(6, 2, 4), (12, 4, 8), (32, 8, 16)])
def test_recommend_cpu_ram_bands(ram, standard, quick, monkeypatch):
    # pure: it must not look at this machine
    monkeypatch.setattr(psutil, "virtual_memory", lambda: pytest.fail("recommend() probed RAM"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("recommend() probed CUDA"))
    for is_quick, bs in ((False, standard), (True, quick)):
        rec = mo.recommend(fake_profile(ram), is_quick)
        check_entries(rec)
        # the trainers' effective batches, spelled out so a changed constant fails here
        for name, effective in {"gru": 64, "classifier": 16, "asr": 8, "lm": 32}.items():  # asr: minimal's
            assert rec[name]["batch_size"]["value"] == bs
            assert rec[name]["grad_accum"]["value"] == max(1, math.ceil(effective / bs))
            assert "precision" not in rec[name]  # the trainer measures it
        assert rec["gru"]["grad_accum"]["value"] * bs == 64
        assert rec["classifier"]["preset"]["value"] == "fasttext"  # measured best on small data, any RAM
        assert rec["classifier"]["workers"]["value"] == 2  # min(2, 8 // 2)
        assert rec["classifier"]["pin_memory"]["value"] is False
        assert rec["asr"]["preset"]["value"] == "minimal"
        assert rec["lm"]["seq_len"]["value"] == 256 and rec["lm"]["preset"]["value"] == "tiny"
        assert rec["lm"]["seq_len"]["quick_value"] == 64
        assert rec["gru"]["preset"]["value"] == "optimized"


def test_recommend_cuda_and_small_cpu():
    small = mo.recommend(fake_profile(16, cores=2, gpu_free=3.0, bf16=False), quick=False)
    check_entries(small)
    assert small["lm"]["batch_size"]["value"] == 4  # < 4 GB free: 8 quick, 4 standard
    assert small["lm"]["precision"]["value"] == "fp16"
    assert small["lm"]["seq_len"]["value"] == 1024
    assert small["asr"]["preset"]["value"] == "minimal"
    assert small["lm"]["preset"]["value"] == "small"
    assert small["classifier"]["pin_memory"]["value"] is True
    assert small["classifier"]["workers"]["value"] == 2  # min(4, 2 cores)

    big = mo.recommend(fake_profile(6, cores=16, gpu_free=40.0, bf16=True), quick=True)
    assert big["gru"]["batch_size"]["value"] == 64 and big["gru"]["grad_accum"]["value"] == 1
    assert big["classifier"]["grad_accum"]["value"] == 1  # micro-batch 64 > effective 16
    assert big["lm"]["precision"]["value"] == "bf16"
    assert big["lm"]["seq_len"]["value"] == 2048
    assert big["asr"]["preset"]["value"] == "optimized"
    assert big["classifier"]["preset"]["value"] == "fasttext"  # a GPU too: the data, not the machine, decides
    assert big["lm"]["workers"]["value"] == 4
    # only settings a trainer reads: train_gru.py and train_asr.py have no DataLoader
    assert not {"workers", "pin_memory"} & (set(big["gru"]) | set(big["asr"]))

    laptop = mo.recommend(fake_profile(8, cores=1), quick=False)
    assert laptop["lm"]["workers"]["value"] == 1  # never 0: min(2, max(1, 1 // 2))
    laptop = mo.recommend(fake_profile(8, cores=2), quick=False)
    assert laptop["lm"]["workers"]["value"] == 1  # half the cores: the other one trains


def test_effective_batch_covers_every_trainer():
    import train_asr
    assert set(mo.EFFECTIVE_BATCH) == set(TRAINERS)
    assert mo.ASR_MINIMAL_EFFECTIVE_BATCH == train_asr.EFFECTIVE_BATCH["minimal"]  # a copy: they must agree


# -----------------------------------------------------------------------------
# optimize

def test_optimize_reports_and_never_kills(tmp_path):
    r = run(tmp_path, "optimize", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "never kills" in r.stdout
    assert "RAM:" in r.stdout and "GB available" in r.stdout
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["pid", "name"])
    rows = []
    for line in lines[head + 1:]:
        if not line.strip():
            break
        rows.append(line)
    assert len(rows) == 3, r.stdout  # --top 3, and any machine runs at least 3 processes
    rss = [float(row[31:39]) for row in rows]  # fixed columns: names may contain spaces
    assert rss == sorted(rss, reverse=True)


def test_top_processes_sorted():
    top = mo.top_processes(5)
    assert 1 <= len(top) <= 5
    assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)


# -----------------------------------------------------------------------------
# monitor

def write_status(runs, name, **status):
    d = runs / name
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"trainer": "gru", "out": str(d), "started": time.time(),
                                               **status}))


def test_monitor_csv_and_running_runs(tmp_path):
    runs = tmp_path / "runs"
    # a stand-in trainer: a live python process whose command line names the script, with its
    # create time in status.json, which is what mo.process_is_trainer checks
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "train_gru.py",
                              str(runs / "live")])
    try:
        write_status(runs, "live", state="running", pid=child.pid, step=7, total_steps=100, loss=1.2345,
                     pid_created=psutil.Process(child.pid).create_time())
        write_status(runs, "done", state="finished", pid=child.pid, step=100, total_steps=100, loss=0.5)
        # alive but not a trainer (this test process): shown as dead, not as running
        write_status(runs, "ghost", state="running", pid=psutil.Process().pid, step=3, loss=9.0)
        csv_path = tmp_path / "mem.csv"
        r = run(tmp_path, "monitor", "--duration", "2", "--interval", "1", "--csv", str(csv_path))
        assert r.returncode == 0, r.stderr
    finally:
        child.kill()
        child.wait()
    want = "live 7/100 loss 1.2345"
    assert want in r.stdout and "done" not in r.stdout and "ghost" not in r.stdout
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == mo.CSV_COLUMNS
    assert len(rows) == 3, rows  # header + a row at 1 s and at 2 s
    for row in rows[1:]:
        rec = dict(zip(rows[0], row))
        assert 0 < float(rec["ram_pct"]) <= 100
        assert 0 < float(rec["ram_avail_gb"])
        assert 0 <= float(rec["cpu_pct"]) <= 100
        assert rec["running_runs"] == want
        assert (rec["gpu_total_mb"] == "") == (not torch.cuda.is_available())


def test_monitor_appends_without_second_header(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_status(tmp_path / "runs", "done", state="finished", pid=1, step=5, loss=0.1)
    for _ in range(2):
        assert mo.main(["monitor", "--duration", "0.05", "--interval", "0.05", "--csv", "m.csv"]) == 0
    rows = list(csv.reader(open(tmp_path / "m.csv", newline="")))
    assert rows[0] == mo.CSV_COLUMNS and len(rows) == 3 and rows[2][0] != "time"
    assert all(row[-1] == "-" for row in rows[1:])  # a finished run is not running
    assert "rows appended to m.csv" in capsys.readouterr().out


def test_running_summary():
    assert mo.running_summary([]) == "-"
    assert mo.running_summary([(Path("runs/a"), {"state": "finished", "step": 3})]) == "-"
    assert mo.running_summary([(Path("runs/b"), {"state": "running", "pid": None})]) == "-"


def test_monitor_bad_input(tmp_path):
    r = run(tmp_path, "monitor", "--duration", "0")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--duration" in lines[0], r.stderr
    with pytest.raises(UserError, match="--csv"):
        mo.main(["monitor", "--duration", "1", "--csv", str(tmp_path / "missing" / "m.csv")])
    with pytest.raises(SystemExit) as e:
        mo.main(["monitor", "--interval", "-1"])
    assert e.value.code == 2


def test_monitor_of_one_run_refuses_machine_flags(tmp_path):
    with pytest.raises(UserError, match="--duration/--csv"):
        mo.main(["monitor", "runs/x", "--csv", str(tmp_path / "m.csv")])
    with pytest.raises(UserError, match="--duration/--csv"):
        mo.main(["monitor", "--latest", "--duration", "5"])


# -----------------------------------------------------------------------------
# background runs: start / status / monitor RUN / stop (what run.sh and start_training.bat call)

SMALL = ["--quick", "--dataset-size", "1500", "--batch-size", "8"]




def read_json(path):
    return json.loads(Path(path).read_text())


def test_background_start_status_monitor_stop(tmp_path):
    tmp = tmp_path
    r = run(tmp, "start", "gru", *SMALL, "--epochs", "100", "--out", "runs/bg", timeout=180)
    assert r.returncode == 0, r.stderr
    assert "runs/bg" in r.stdout and "pid" in r.stdout
    out = tmp / "runs" / "bg"
    wait_for(lambda: read_json(out / "status.json").get("state") == "running" and
             read_json(out / "status.json").get("step", 0) >= 5, what="running")
    s = run(tmp, "status")
    assert s.returncode == 0 and "bg" in s.stdout and "running" in s.stdout, s.stderr
    # a second trainer in the same run folder is refused while the first one is alive
    t = subprocess.run([sys.executable, str(REPO / "train_gru.py"), *SMALL, "--out", "runs/bg"], cwd=tmp,
                       capture_output=True, text=True, timeout=120)
    assert t.returncode == 2 and "is being trained by pid" in t.stderr, t.stderr
    st = run(tmp, "stop", "runs/bg", timeout=180)
    assert st.returncode == 0 and "stopped" in st.stdout, st.stderr
    final = read_json(out / "status.json")
    assert final["state"] == "stopped" and Path(final["last_checkpoint"]).exists()
    for args in (["monitor", "runs/bg"], ["monitor", "--latest"]):  # return at once: the run has ended
        m = run(tmp, *args, timeout=30)
        assert m.returncode == 0 and "bg: stopped | step" in m.stdout, m.stderr
    # a run that has not logged or evaluated yet: "-" for what it does not know (was Python's None)
    early = tmp / "runs" / "early"
    early.mkdir()
    (early / "status.json").write_text(json.dumps({"state": "finished", "trainer": "gru", "out": str(early),
                                                   "started": time.time(), "step": 0, "metric_name": "val_ppl"}))
    m = run(tmp, "monitor", "runs/early", timeout=30)
    assert m.returncode == 0, m.stderr
    assert "early: finished | step 0/- | loss - | val_ppl - | - samples/s | ETA" in m.stdout, m.stdout
    assert "None" not in m.stdout
    # a run whose pid is alive but is not its trainer (a recycled pid) must not be signalled
    fake = tmp / "runs" / "fake"
    fake.mkdir()
    (fake / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid(), "trainer": "gru",
                                                  "out": str(fake), "started": time.time()}))
    r = run(tmp, "stop", "runs/fake")
    assert r.returncode == 2 and "is not this run's trainer" in r.stderr
    # a bad flag is reported by `start` itself (exit 2), and the stopped run's files are untouched
    before = tree_digest(out, skip="console.log")
    r = run(tmp, "start", "gru", "--batch-size", "0", "--out", "runs/bg", timeout=120)
    assert r.returncode == 2 and "--batch-size" in r.stderr and "exited with code 2" in r.stderr
    assert tree_digest(out, skip="console.log") == before
    s = run(tmp, "status")
    assert "dead" in s.stdout  # shown honestly, not as running


def test_start_without_out_goes_on_with_the_same_commands_unfinished_run(tmp_path):
    """`start gru --quick` (the .bat menu's first entry) twice: the second continues the first's
    folder when that one did not finish; another command, a finished run or --no-resume: a new one."""
    def fake_run(name, flags, state, started):
        d = tmp_path / name
        d.mkdir()
        (d / "status.json").write_text(json.dumps({"trainer": "gru", "state": state, "started": started}))
        (d / "args.json").write_text(json.dumps({"argv": ["train_gru.py", *flags, "--out", str(d)]}))
    fake_run("a", ["--quick"], "stopped", 1.0)
    fake_run("b", ["--quick"], "failed", 2.0)
    fake_run("c", ["--quick"], "finished", 3.0)
    fake_run("d", ["--quick", "--seed", "2"], "stopped", 4.0)
    assert mo.unfinished_start("gru", ["--quick"], tmp_path) == tmp_path / "b"
    assert mo.unfinished_start("gru", ["--quick", "--epochs", "2"], tmp_path) is None
    assert mo.unfinished_start("lm", ["--quick"], tmp_path) is None


def test_run_manager_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="unknown trainer 'gpt'; choose from gru, classifier, asr, lm, sft"):
        mo.main(["start", "gpt", "--quick"])
    with pytest.raises(UserError, match="no running run under runs/"):
        mo.main(["stop"])
    with pytest.raises(UserError, match="no status.json there; `python memory_optimizer.py status`"):
        mo.main(["monitor", "runs/nope"])
    assert mo.main(["status"]) == 0 and "no runs under runs/" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # only `start` passes unknown flags on (to the trainer)
        mo.main(["status", "--quick"])
    assert e.value.code == 2
    assert TRAINERS["sft"] == "train_sft.py"


# -----------------------------------------------------------------------------
# which process stop may signal, runs started elsewhere, a refused start, a corrupt status.json

# a trainer as status/stop see it, without torch: a python process running a train_gru.py that
# writes status.json like common.start_run and saves ("stopped") on SIGTERM
FAKE_TRAINER = """
import json, os, signal, sys, time
from pathlib import Path
import psutil
out = Path(sys.argv[sys.argv.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
st = {"state": "running", "pid": os.getpid(), "pid_created": psutil.Process().create_time(),
      "trainer": "gru", "out": str(out.resolve()), "started": time.time(), "step": 1}
def write(**changes):
    st.update(changes)
    (out / "status.tmp").write_text(json.dumps(st))
    os.replace(out / "status.tmp", out / "status.json")
def stop(*_):
    write(state="stopped")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
write()
time.sleep(60)
write(state="finished")
"""


def start_fake_trainer(tmp, out):
    script = tmp / "fake" / "train_gru.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text(FAKE_TRAINER)
    child = subprocess.Popen([sys.executable, "-u", str(script), "--out", out], cwd=tmp)
    wait_for(lambda: common.read_status(tmp / out).get("pid") == child.pid, what="the fake trainer's status.json")
    return child


def status_rows(stdout):
    """{run name: shown state} from the `status` table."""
    return {line.split()[0]: line.split()[2] for line in stdout.splitlines()[2:]}


def test_stop_on_a_copied_run_folder_leaves_the_original_running(tmp_path):
    child = start_fake_trainer(tmp_path, "runs/live")
    try:
        # the copy's status.json names the original's pid and folder: it is not that run
        shutil.copytree(tmp_path / "runs" / "live", tmp_path / "runs" / "copy")
        s = call("memory_optimizer.py", "status", cwd=tmp_path)
        assert status_rows(s.stdout) == {"live": "running", "copy": "copy"}, s.stdout
        for cmd in ("stop", "monitor"):
            r = call("memory_optimizer.py", cmd, "runs/copy", cwd=tmp_path)
            assert r.returncode == 2 and "runs/copy is a copy of the run folder" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
        assert child.poll() is None and not (tmp_path / "runs" / "live" / "STOP").exists()
        r = call("memory_optimizer.py", "stop", cwd=tmp_path)  # the newest running run: the original
        assert r.returncode == 0 and "runs/live: stopped" in r.stdout, r.stdout + r.stderr
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()


def test_stop_signals_only_the_runs_trainer(tmp_path):
    """A pid is the run's trainer only if it is a python process created when status.json says
    (pid_created), with the trainer script in its argv and, when it has --out, the run's folder."""
    runs = tmp_path / "runs"
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "train_gru.py"]
    lookalike = subprocess.Popen([*sleeper, "--out", "runs/x"], cwd=tmp_path)
    (tmp_path / "fake").mkdir()
    elsewhere = subprocess.Popen([*sleeper, "--out=runs/x"], cwd=tmp_path / "fake")
    # a builtin waiting on its stdin: bash forks no child that killing it would leave behind
    pager = subprocess.Popen(["bash", "-c", "read -t 60", "train_gru.py"], stdin=subprocess.PIPE) \
        if shutil.which("bash") else None
    try:
        # status.json without pid_created (as a hand-made or pre-create-time one): nothing is signalled
        write_status(runs, "x", state="running", pid=lookalike.pid)
        r = call("memory_optimizer.py", "stop", "runs/x", cwd=tmp_path)
        assert r.returncode == 2 and "is not this run's trainer" in r.stderr, r.stderr
        assert lookalike.poll() is None and not (runs / "x" / "STOP").exists()

        created = psutil.Process(lookalike.pid).create_time()
        st = {"state": "running", "pid": lookalike.pid, "pid_created": created, "trainer": "gru",
              "out": str(runs / "x")}
        assert mo.process_is_trainer(st)
        assert not mo.process_is_trainer({**st, "pid_created": None})
        assert not mo.process_is_trainer({**st, "pid_created": created + 5})  # a recycled pid
        assert not mo.process_is_trainer({**st, "out": str(runs / "y")})  # it trains another folder
        assert not mo.process_is_trainer({**st, "trainer": "lm"})
        assert not mo.process_is_trainer({k: v for k, v in st.items() if k != "out"})
        # --out=X is resolved against the process's cwd, not ours
        st2 = {**st, "pid": elsewhere.pid, "pid_created": psutil.Process(elsewhere.pid).create_time()}
        assert not mo.process_is_trainer(st2)
        assert mo.process_is_trainer({**st2, "out": str(tmp_path / "fake" / "runs" / "x")})
        if pager:  # right pid, create time and an argv naming train_gru.py, but not python
            wait_for(lambda: "train_gru.py" in psutil.Process(pager.pid).cmdline(), what="bash's argv")
            assert not mo.process_is_trainer(
                {**st, "pid": pager.pid, "pid_created": psutil.Process(pager.pid).create_time()})
    finally:
        for p in (lookalike, elsewhere, pager):
            if p:
                p.kill()
                p.wait()


def test_run_started_elsewhere_is_listed_and_stopped(tmp_path):
    """start records a run folder outside --runs in <runs>/started.txt; status/stop --runs find it."""
    r = run(tmp_path, "start", "gru", *SMALL, "--epochs", "100", "--out", "elsewhere/x", "--runs", "R",
            timeout=180)
    assert r.returncode == 0, r.stderr
    out = (tmp_path / "elsewhere" / "x").resolve()
    try:
        assert (tmp_path / "R" / "started.txt").read_text().splitlines() == [str(out)]
        wait_for(lambda: common.read_status(out).get("state") == "running", what="running")
        s = call("memory_optimizer.py", "status", "--runs", "R", cwd=tmp_path)
        assert s.returncode == 0 and status_rows(s.stdout) == {"x": "running"}, s.stdout
        st = call("memory_optimizer.py", "stop", "--runs", "R", cwd=tmp_path)  # no RUN: the newest running one
        assert st.returncode == 0 and f"{out}: stopped" in st.stdout, st.stdout + st.stderr
    finally:  # a failed assertion must not leave a 100-epoch trainer behind
        if mo.process_is_trainer(common.read_status(out)):
            psutil.Process(common.read_status(out)["pid"]).kill()
    assert common.read_status(out)["state"] == "stopped"
    shutil.rmtree(out)  # a registered folder that is gone is skipped
    assert "no runs under R/" in call("memory_optimizer.py", "status", "--runs", "R", cwd=tmp_path).stdout


def test_start_with_a_mistake_leaves_no_folder(tmp_path):
    r = run(tmp_path, "start", "gru", "--epochs", "-1", timeout=120)
    assert r.returncode == 2 and "--epochs" in r.stderr and "exited with code 2" in r.stderr, r.stderr
    assert "console.log" not in r.stderr  # it was removed with the folder
    assert list(tmp_path.iterdir()) == []  # neither runs/ nor runs/gru-<time> nor a console.log
    # what was there before stays: runs/ and its file; only runs/new/x, made by start, goes
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("mine")
    r = run(tmp_path, "start", "gru", "--epochs", "-1", "--out", "runs/new/x", timeout=120)
    assert r.returncode == 2 and "--epochs" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["keep.txt"]


def test_corrupt_status_json_is_no_traceback(tmp_path):
    runs = tmp_path / "runs"
    for name, data in (("text", b"{not json"), ("bytes", b"\xff\xfe{}"), ("list", b"[1, 2]")):
        (runs / name).mkdir(parents=True)
        (runs / name / "status.json").write_bytes(data)
    s = call("memory_optimizer.py", "status", cwd=tmp_path)
    assert s.returncode == 0 and status_rows(s.stdout) == dict.fromkeys(("text", "bytes", "list"), "corrupt"), \
        s.stdout + s.stderr
    m = call("memory_optimizer.py", "monitor", "--duration", "0.05", "--interval", "0.05", cwd=tmp_path)
    assert m.returncode == 0, m.stderr
    for args, want in ((["stop"], "no running run under runs/"), (["monitor", "--latest"], "no run under runs/"),
                       (["stop", "runs/bytes"], "runs/bytes/status.json: unreadable"),
                       (["monitor", "runs/list"], "runs/list/status.json: unreadable")):
        r = call("memory_optimizer.py", *args, cwd=tmp_path)
        assert r.returncode == 2 and want in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_a_trainer_started_through_a_launcher_process_counts_as_claimed():
    """On Windows a venv's python.exe runs the real interpreter as its child: the pid in the
    trainer's status.json is then a child of the one `start` launched."""
    import memory_optimizer
    from conftest import wait_for
    launcher = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run("
                                 "[sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        wait_for(lambda: psutil.Process(launcher.pid).children(), timeout=20)
        child = psutil.Process(launcher.pid).children()[0].pid
        assert memory_optimizer.own_pids(launcher.pid) == {launcher.pid, child}
    finally:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            p.kill()
        launcher.kill()
        launcher.wait()
