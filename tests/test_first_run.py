"""Issue 31, in every trainer: the same command, run without --out, killed with kill -9 after its
first checkpoint and run again, goes on in the same runs/ folder (one folder) and ends with the
weights of an uninterrupted run, bit for bit. tests/test_gru.py holds the GRU's case and the rest
of the contract (another command starts a new folder, a finished run says so); the four others
share common.open_run, and this checks each one end to end with its own small shape (the LM's in its eigen
arch). These replace the trainers' own kill -9 tests, which did the same with --out."""
import json
import re
import signal
from pathlib import Path

import pytest
import torch

from conftest import popen, read_json, run, wait_for

# each trainer's small shape (fp32 typed: an untyped precision is timed on the CPU, and the two runs
# compared must not differ by what a busy machine made of that timing), and the step to kill after:
# past the first checkpoint (--save-every 5), before the end
SHAPES = {
    "classifier": (["--preset", "small", "--train-size", "300", "--epochs", "2", "--save-every", "5",
                    "--log-every", "1", "--precision", "fp32"], 8),
    "asr": (["--quick", "--dataset-size", "64", "--batch-size", "16", "--max-steps", "20", "--save-every", "5",
             "--log-every", "1", "--eval-every", "8"], 7),
    "lm": (["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
            "--grad-accum", "2", "--eval-tokens", "512", "--precision", "fp32", "--max-steps", "40", "--save-every",
            "5", "--eval-every", "10", "--log-every", "2", "--arch", "eigen", "--chunk-size", "12"], 12),
    "sft": (["--quick", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "160", "--precision",
             "fp32", "--data", "few.jsonl", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "30",
             "--save-every", "5", "--eval-every", "10", "--log-every", "2"], 12),
}


def step_reached(run_dirs, n):
    for d in run_dirs:
        try:
            if read_json(d / "status.json").get("step", 0) >= n:
                return True
        except (OSError, ValueError):  # not written yet, or caught mid-replace
            pass
    return False


def last_weights(run_dir):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("ckpt_step*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]


@pytest.mark.parametrize("name", list(SHAPES))
def test_rerun_without_out_after_kill_9_resumes_the_same_folder_bit_for_bit(name, tmp):
    flags, kill_at = SHAPES[name]
    if name == "sft":  # every 30th built-in pair: a plumbing run, its test split decodes in seconds
        import train_sft
        (tmp / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))
    script = f"train_{name}.py"
    run(script, *flags, "--out", "ref", cwd=tmp, check=0)
    proc = popen(script, *flags, cwd=tmp)
    wait_for(lambda: step_reached((tmp / "runs").glob(f"{name}-*"), kill_at), timeout=240, what=f"step {kill_at}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    (killed,) = (tmp / "runs").glob(f"{name}-*")
    assert not (killed / "summary.json").exists()
    p = run(script, *flags, cwd=tmp, check=0)
    assert p.stdout.startswith(f"resuming {Path('runs') / killed.name}, the newest unfinished run of this command")
    assert "resumed from" in p.stdout
    assert [d.name for d in (tmp / "runs").iterdir()] == [killed.name]
    ref, got = last_weights(tmp / "ref"), last_weights(killed)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert read_json(killed / "summary.json")["value"] == read_json(tmp / "ref" / "summary.json")["value"]


# a run at the first batch, stopped after `at` steps (its summary removed: as if killed after that
# checkpoint), resumed with the second batch typed, which changes the effective batch
REBATCH = {
    "classifier": (["--preset", "small", "--train-size", "120", "--epochs", "2", "--save-every", "5",
                    "--precision", "fp32"], ("4", "2"), ("4", "4"), 10),
    "asr": (["--quick", "--dataset-size", "64", "--epochs", "2", "--save-every", "2"], ("4", "2"), ("4", "4"), 4),
    # the LM counts in steps (--max-steps): the step stays, each one now draws the new batch (train_sft.py
    # resumes through the same train_lm.resume)
    "lm": (SHAPES["lm"][0][:8] + ["--eval-tokens", "512", "--precision", "fp32", "--max-steps", "20",
                                  "--save-every", "5", "--eval-every", "10"], ("4", "2"), ("4", "1"), 10),
}


@pytest.mark.parametrize("name", list(REBATCH))
def test_resume_with_a_new_effective_batch_goes_on_and_ends_like_a_run_at_that_batch(name, tmp):
    """Issue 31: a new effective batch typed on resume is allowed and said (common.rebatch: the step
    moves to the same share of the epoch and schedule), and the run ends after as many steps as a
    run at the new batch from the start. The GRU's case, with its figures, is in test_gru.py."""
    flags, (b0, a0), (b1, a1), at = REBATCH[name]
    script = f"train_{name}.py"
    run(script, *flags, "--batch-size", b0, "--grad-accum", a0, "--max-steps", at, "--out", "r", cwd=tmp,
        check=0)  # the later --max-steps wins
    (tmp / "r" / "summary.json").unlink()
    run(script, *flags, "--batch-size", b1, "--grad-accum", a1, "--out", "ref", cwd=tmp, check=0)
    p = run(script, *flags, "--batch-size", b1, "--grad-accum", a1, "--out", "r", cwd=tmp, check=0)
    was, now = int(b0) * int(a0), int(b1) * int(a1)
    assert f"{b1} x {a1} (--batch-size and --grad-accum typed), for the checkpoint's {b0} x {a0}: a new effective batch (was {was})" in p.stdout
    total = read_json(tmp / "ref" / "summary.json")["steps"]
    moved = re.search(rf"new effective batch: step {at} of (\d+) is now step (\d+) of {total} ", p.stdout)
    assert moved and int(moved[2]) == at * total // int(moved[1]), p.stdout[-3000:]
    # and the run really goes on from there: its progress bar starts at the moved step
    assert re.search(rf"(?<!\d){moved[2]}/{total} ", p.stderr), p.stderr[-2000:]
    if name in ("classifier", "asr"):  # epochs: the steps of the run scale with the batch (up to the last, partial one)
        assert int(moved[1]) != total and abs(int(moved[1]) * was - total * now) <= max(was, now) * 2
    assert read_json(tmp / "r" / "summary.json")["steps"] == total
