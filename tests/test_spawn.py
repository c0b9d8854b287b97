"""Every trainer runs under the spawn start method.

Windows and macOS start DataLoader workers with spawn (and Python 3.14's Linux default,
forkserver, pickles the same way): the worker gets the dataset, collate_fn and worker_init_fn
by pickle, so a lambda or a function local to train() kills the run as soon as the first worker
starts ("Can't pickle local object 'train.<locals>.<lambda>'", train_classifier.py until its
loader became common.StepBatches(rows_batch, ...)). Linux CI forks and never sees it.

No product knob forces spawn: a child interpreter sets the start method, then runs the script
as __main__ with runpy. runpy sets sys.modules["__main__"].__file__ to the script, so spawn's
children re-import it as __mp_main__ and pickled references to its module functions resolve
(test_the_harness_catches_what_spawn_cannot_pickle proves both halves). Loader workers come from
optimal_config.json ("workers" is a setting without a flag: the config sets it, args.json
records it).
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, read_json

SPAWN = ("import multiprocessing as mp, os, runpy, sys; mp.set_start_method('spawn', force=True); "
         "script = sys.argv[1]; sys.path.insert(0, os.path.dirname(os.path.abspath(script))); "
         "sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')")

# script -> (tiny flags, its optimal_config.json section to give 1 loader worker; None: no DataLoader)
RUNS = {
    "train_classifier.py": (["--quick", "--train-size", "200", "--max-steps", "3"], "classifier"),
    "train_lm.py": (["--quick", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
                     "--batch-size", "4", "--grad-accum", "1", "--eval-tokens", "512", "--max-steps", "2"], "lm"),
    "train_gru.py": (["--quick", "--dataset-size", "300", "--max-steps", "2"], None),
    "train_asr.py": (["--quick", "--dataset-size", "40", "--max-steps", "1", "--beam", "1"], None),
    "train_sft.py": (["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "160", "--data",
                      "few.jsonl", "--max-steps", "2"], "sft"),
}


def spawn_run(script_path, *args, cwd, timeout=180):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "-c", SPAWN, str(script_path), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", list(RUNS))
def test_trainer_runs_under_spawn(tmp, script):
    flags, section = RUNS[script]
    if "few.jsonl" in flags:  # every 30th built-in pair: the final test decoding takes seconds
        import train_sft
        (tmp / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))
    if section:
        (tmp / "optimal_config.json").write_text(json.dumps({"trainers": {section: {"workers": 1}}}))
    p = spawn_run(REPO / script, *flags, "--out", "s", cwd=tmp)
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-2000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    assert read_json(tmp / "s" / "status.json")["state"] == "finished"
    if section:  # the run really had a loader worker to start
        workers = read_json(tmp / "s" / "args.json")["settings"]["workers"]
        assert workers == {"value": 1, "source": "optimal_config.json"}


PROBE = '''import sys
import torch

def collate(batch):
    return batch

def main():  # the classifier's old shape: a lambda local to the function that builds the loader
    fn = collate if "module" in sys.argv else (lambda batch: batch)
    print(list(torch.utils.data.DataLoader(range(4), batch_size=2, num_workers=1, collate_fn=fn)))

if __name__ == "__main__":
    main()
'''


def test_the_harness_catches_what_spawn_cannot_pickle(tmp):
    """Without this, a harness that silently forked would pass every trainer above."""
    (tmp / "probe.py").write_text(PROBE)
    p = spawn_run(tmp / "probe.py", "lambda", cwd=tmp)
    assert p.returncode != 0 and "Can't pickle local object 'main.<locals>.<lambda>'" in p.stderr, p.stderr[-2000:]
    p = spawn_run(tmp / "probe.py", "module", cwd=tmp)  # a module function: resolved via __mp_main__
    assert p.returncode == 0 and "[[0, 1], [2, 3]]" in p.stdout, p.stderr[-2000:]
