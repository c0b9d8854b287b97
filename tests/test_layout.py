"""The small core (issue 30): each trainer, copied with common.py alone into an empty folder
(train_sft.py with train_lm.py), runs --quick; that run imports none of the opt-in modules
(download, records, adamw8bit, precision_probe, ddp) nor memory_plan.py and never starts torch's profiler; its
train.log has the per-interval loss line. train_sft.py's quick run ends by decoding every test pair with an
untrained model (370 pairs: 80 s on one core), so here its built-in set has 5 pairs a template, not 100.
And the sizes a reader sees: no line over 120 characters, no
module over ~1,200 lines (1,270: train_classifier.py is 1,261) but common.py, held under 1,520 (issue 30
asks ~1,000: not met, see docs/tests.md)."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPT_IN = ("download", "records", "adamw8bit", "memory_plan", "precision_probe", "ddp", "memory_optimizer")
TRAINERS = {"gru": ["train_gru.py"], "classifier": ["train_classifier.py"], "asr": ["train_asr.py"],
            "lm": ["train_lm.py"], "sft": ["train_sft.py", "train_lm.py"]}

# Runs the trainer as `python train_X.py ...` would (runpy, __main__), with torch's profiler made to
# raise if anything starts it, and writes the names of the modules loaded by the end to modules.txt.
RUNNER = """
import atexit, runpy, sys, torch
def no_profiler(*a, **k):
    raise AssertionError("the torch profiler was started on a default run")
torch.autograd.profiler.profile = no_profiler
torch.profiler.profile = no_profiler
atexit.register(lambda: open("modules.txt", "w").write("\\n".join(sorted(sys.modules))))
sys.argv = sys.argv[1:]
if sys.argv[0] == "train_sft.py":
    import functools, common, train_sft
    train_sft.builtin_pairs = functools.partial(train_sft.builtin_pairs, per_template=5)
    common.run_main(train_sft.main)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name", list(TRAINERS))
def test_a_trainer_copied_with_common_alone_runs_quick_and_loads_only_the_core(name, tmp_path):
    for f in ["common.py", *TRAINERS[name]]:
        shutil.copy(REPO / f, tmp_path / f)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    p = subprocess.run([sys.executable, "runner.py", TRAINERS[name][0], "--quick", "--max-steps", "2", "--log-every",
                        "1", "--out", "r"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    loaded = set((tmp_path / "modules.txt").read_text().split())
    assert not loaded & set(OPT_IN), loaded & set(OPT_IN)
    log = (tmp_path / "r" / "train.log").read_text()
    assert "memory plan: none (memory_plan.py is not beside the trainer)" in log, log
    lines = re.findall(r"step +\d+/\d+ \| loss [\d.]+ \| lr \S+ \| \d+ ms/step \| [\d,]+ \S+/s \| (RAM|GPU) \d+ MB", log)
    assert len(lines) >= 2, log  # one per --log-every interval


def test_no_line_over_120_characters_and_no_module_over_about_1200_lines():
    for f in sorted(REPO.glob("*.py")):
        lines = f.read_text(encoding="utf-8").splitlines()
        # common.py: issue 30's ~1,000 is not met; this stops growth (1,700 until the memory plan moved
        # to memory_plan.py and the end-of-run plot went; 1,565 until reading optimal_config.json moved
        # to memory_optimizer.py, which writes it: 1,509)
        assert len(lines) <= (1520 if f.name == "common.py" else 1270), f"{f.name}: {len(lines)} lines"
        long = [i for i, line in enumerate(lines, 1) if len(line) > 120]
        assert not long, f"{f.name}: lines over 120 characters: {long[:10]}"


@pytest.mark.parametrize("flag, module", [("--optim adamw8bit", "adamw8bit"), ("--plan", "memory_plan"),
                                          ("", "memory_optimizer")])
def test_an_opt_in_flag_on_a_trainer_copied_alone_names_the_file_it_needs(flag, module, tmp_path):
    for f in ["common.py", "train_gru.py"]:
        shutil.copy(REPO / f, tmp_path / f)
    if module == "memory_optimizer":  # it writes optimal_config.json and reads it for the trainers
        (tmp_path / "optimal_config.json").write_text('{"trainers": {"gru": {}}}')
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH="")
    p = subprocess.run([sys.executable, "train_gru.py", "--quick", *flag.split(), "--out", "r"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    why = {"memory_plan": "--plan or --measure-peak", "memory_optimizer":
           "optimal_config.json (read where it is; move it away to run without it)"}.get(module, flag)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == \
        f"error: {why} needs {module}.py beside train_gru.py; copy it from lean-train", p.stderr
    assert "Traceback" not in p.stderr
