"""train_gru.py end to end: the real script in subprocesses, on CPU, with small built-in data."""
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_plan_near_peak, call, metrics, popen, read_json, run, tree_digest, wait_for

# tests run in an empty tmp dir, so no optimal_config.json is picked up unless a test writes one
SMALL = ["--quick", "--dataset-size", "1500", "--batch-size", "8"]


def weights(run_dir):
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("ckpt_step*.pt"))
    return torch.load(ckpts[-1], weights_only=True)["model"]



@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The README's quick run, once for the tests that need a trained model; --measure-peak: on a CPU
    the profiler measures the peak that assert_plan_near_peak compares with the plan only under it."""
    d = tmp_path_factory.mktemp("quick")
    p = run("train_gru.py", "--quick", "--measure-peak", "--out", "runs/q", cwd=d, check=0)
    return d / "runs" / "q", p


def test_quick_run_learns_and_writes_the_run_folder(quick_run):
    out, p = quick_run
    s = read_json(out / "summary.json")
    # the bar: a category-conditioned model must beat a category-blind unigram model by far
    assert s["value"] < 0.25 * s["unigram_ppl"], s
    for key in ("trainer", "metric", "value", "steps", "samples_per_s", "peak_mem_mb", "params",
                "trainable_params", "wall_s"):
        assert key in s
    assert s["trainer"] == "gru" and s["metric"] == "val_ppl" and s["steps"] > 0
    assert_plan_near_peak(s)
    st = read_json(out / "status.json")
    assert st["state"] == "finished" and st["step"] == s["steps"] and st["last_checkpoint"]
    a = read_json(out / "args.json")
    assert a["settings"]["batch_size"]["source"] == "auto"
    assert a["settings"]["epochs"] == {"value": 3, "source": "quick"}  # the default 8, shortened
    assert a["chosen"]["effective_batch"] == 64
    recs = metrics(out)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    assert (out / "train.log").read_text().count("val loss") >= 3
    assert "device cpu, precision fp32" in p.stdout
    assert "suggest 'red run' [fashion]: red running" in p.stdout
    names = {f.name for f in (out / "checkpoints").iterdir()}
    assert "best.pt" in names and len([n for n in names if n.startswith("ckpt_step") and n.endswith(".pt")]) <= 3


def test_one_plain_line_per_log_interval_reaches_train_log(quick_run):
    out, p = quick_run
    lines = [l for l in (out / "train.log").read_text().splitlines() if re.search(r"step .* \| loss .* ms/step", l)]
    steps = read_json(out / "summary.json")["steps"]
    assert len(lines) == math.ceil(steps / 10)  # --log-every 10, and the last step
    assert re.search(rf"step +{steps}/{steps} \| loss \d+\.\d{{4}} \| lr \S+ \| \d+ ms/step \| [\d,]+ queries/s \| "
                     r"RAM \d+ MB$", lines[-1]), lines[-1]
    assert lines[-1].split(" ", 2)[2] in p.stdout  # the console gets the same line (above the bar)


def test_same_seed_same_numbers(tmp):
    for name in ("a", "b"):
        run("train_gru.py", *SMALL, "--max-steps", "12", "--out", name, cwd=tmp, check=0)
    assert metrics(tmp / "a") == metrics(tmp / "b")


def step_reached(status_path, n):
    try:
        return read_json(status_path).get("step", 0) >= n
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("save_every,kill_at", [(5, 35), (30, 12)])  # (30, 12): before any checkpoint
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp, save_every, kill_at):
    flags = [*SMALL, "--max-steps", "45", "--save-every", save_every, "--eval-every", "20", "--log-every", "2"]
    run("train_gru.py", *flags, "--out", "ref", cwd=tmp, check=0)
    proc = popen("train_gru.py", *flags, "--out", "killed", cwd=tmp)
    wait_for(lambda: step_reached(tmp / "killed" / "status.json", kill_at), what=f"step {kill_at}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_json(tmp / "killed" / "status.json")["state"] == "running"  # it had no chance to say
    p = run("train_gru.py", *flags, "--out", "killed", cwd=tmp, check=0)
    assert ("resumed from" in p.stdout) == (kill_at >= save_every)  # else it starts over
    assert metrics(tmp / "killed") == metrics(tmp / "ref")  # nothing the killed run wrote is doubled
    ref, got = weights(tmp / "ref"), weights(tmp / "killed")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert read_json(tmp / "killed" / "summary.json")["value"] == read_json(tmp / "ref" / "summary.json")["value"]


def test_corrupt_newest_checkpoint_warns_and_resumes_from_the_previous(tmp):
    run("train_gru.py", *SMALL, "--max-steps", "20", "--save-every", "5", "--out", "r", cwd=tmp, check=0)
    newest = tmp / "r" / "checkpoints" / "ckpt_step00000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    p = run("train_gru.py", *SMALL, "--max-steps", "25", "--save-every", "5", "--out", "r", cwd=tmp, check=0)
    assert "ckpt_step00000020.pt is unreadable" in p.stdout
    assert "resumed from" in p.stdout and "ckpt_step00000015.pt" in p.stdout
    assert read_json(tmp / "r" / "status.json")["state"] == "finished"


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp):
    proc = popen("train_gru.py", *SMALL, "--epochs", "50", "--save-every", "1000", "--out", "t", cwd=tmp)
    wait_for(lambda: (tmp / "t" / "status.json").exists() and
             read_json(tmp / "t" / "status.json").get("step", 0) >= 10, what="10 steps")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    st = read_json(tmp / "t" / "status.json")
    assert st["state"] == "stopped" and "SIGTERM" in out
    ckpt = Path(st["last_checkpoint"])
    assert ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] == st["step"]


def test_measured_defaults_are_recorded_in_args_json(tmp):
    """The defaults chosen on real text (README "GRU on real categorized text") reach args.json with
    their source, so a run says which values it trained with; the seed's values are flags away."""
    run("train_gru.py", "--dataset-size", "300", "--max-steps", "2", "--out", "d", cwd=tmp, check=0)
    s = read_json(tmp / "d" / "args.json")["settings"]
    assert s["lr"] == {"value": 3e-3, "source": "default"}
    assert s["epochs"] == {"value": 8, "source": "default"}
    assert s["dropout"] == {"value": 0.5, "source": "auto"}
    assert s["warmup"] == {"value": 0, "source": "auto"}  # a tenth of 2 steps
    run("train_gru.py", "--dataset-size", "300", "--max-steps", "2", "--lr", "1e-3", "--epochs", "3",
        "--dropout", "0.3", "--warmup", "1", "--out", "s", cwd=tmp, check=0)
    s = read_json(tmp / "s" / "args.json")["settings"]
    assert [s[k] for k in ("lr", "epochs", "dropout", "warmup")] == [
        {"value": v, "source": "flag"} for v in (1e-3, 3, 0.3, 1)]


def test_max_steps_overrides_epochs(tmp):
    run("train_gru.py", *SMALL, "--epochs", "1", "--max-steps", "30", "--out", "m", cwd=tmp, check=0)
    assert read_json(tmp / "m" / "summary.json")["steps"] == 30  # 1 epoch is 22 steps


def test_a_csv_with_an_excel_bom_is_read(tmp):
    rows = "".join(f"{w} shoes size {i},Fashion\n{w} phone {i}gb,Electronics\n"
                   for i in range(20) for w in ("red", "blue"))
    (tmp / "bom.csv").write_bytes("\ufefftext,category\n".encode("utf-8") + rows.encode())
    run("train_gru.py", "--data", "bom.csv", "--max-steps", "2", "--out", "b", cwd=tmp, check=0)
    p = run("train_gru.py", "--suggest", "red ", "--category", "FASHION", "--out", "b", cwd=tmp, check=0)
    assert "category fashion" in p.stdout


def test_rotation_keeps_k_plus_best(tmp):
    run("train_gru.py", *SMALL, "--max-steps", "30", "--save-every", "3", "--keep", "2", "--out", "k",
        cwd=tmp, check=0)
    names = sorted(f.name for f in (tmp / "k" / "checkpoints").iterdir())
    assert names == [n + ext for n in ("best.pt", "ckpt_step00000027.pt", "ckpt_step00000030.pt")
                     for ext in ("", ".sha256")]


def test_resource_efficient_halves_batch_and_cadence(tmp):
    p = run("train_gru.py", *SMALL[:-2], "--resource-efficient", "--max-steps", "4", "--out", "re",
            cwd=tmp, check=0)
    assert "--resource-efficient changes:" in p.stdout
    a = read_json(tmp / "re" / "args.json")
    s = a["settings"]
    assert s["save_every"] == {"value": 25, "source": "resource-efficient"}
    assert s["ram_threshold"]["value"] == 70.0 and s["gpu_threshold"]["value"] == 75.0
    assert s["mem_check_every"]["value"] == 15.0
    from common import table_batch_size
    start = table_batch_size("cpu", True)[0]
    assert a["chosen"]["micro_batch"] == start // 2 and a["chosen"]["effective_batch"] == 64
    assert s["eval_every"] == {"value": 11, "source": "resource-efficient"}  # half of 22 steps/epoch
    assert s["workers"]["value"] == 0 and s["pin_memory"]["value"] is False  # never more loader processes


def test_resource_efficient_adafactor_holds_under_0_7x_the_peak_tensors(quick_run, tmp):
    """--resource-efficient trains with Adafactor, whose factored state is ~0 where AdamW's two moments were
    the largest part of a step's peak tensors: measured by the trainer's own --measure-peak, the peak stays
    under 0.7x of the standard --quick run's (0.57x at 30 steps: docs/run-contract.md); a typed --optim wins."""
    p = run("train_gru.py", "--quick", "--max-steps", "10", "--measure-peak", "--resource-efficient", "--out", "re",
            cwd=tmp, check=0)
    assert re.search(r"optim +adamw -> adafactor", p.stdout), p.stdout
    s, std = read_json(tmp / "re" / "summary.json"), read_json(quick_run[0] / "summary.json")
    assert s["peak_tensor_mb"] <= 0.7 * std["peak_tensor_mb"], (s["peak_tensor_mb"], std["peak_tensor_mb"])
    assert s["optimizer_state_mb"] < 0.05 < std["optimizer_state_mb"]
    p = call("train_gru.py", "--quick", "--max-steps", "12", "--resource-efficient", "--optim", "adamw8bit",
             "--out", "re", cwd=tmp)
    assert re.search(r"optim +adamw -> adamw +kept: given as a flag", p.stdout), p.stdout
    assert p.returncode == 2 and "was trained with Adafactor (--resource-efficient), this run builds AdamW8bit" in (
        p.stdout + p.stderr)


def test_no_resume_moves_old_checkpoints_aside(tmp):
    run("train_gru.py", *SMALL, "--max-steps", "5", "--out", "n", cwd=tmp, check=0)
    p = run("train_gru.py", *SMALL, "--max-steps", "5", "--out", "n", "--no-resume", cwd=tmp, check=0)
    assert "resumed" not in p.stdout
    assert list((tmp / "n").glob("checkpoints.old-*/ckpt_step00000005.pt"))


def test_suggest_is_diverse_and_category_constrained(quick_run, tmp):
    out, _ = quick_run
    p = run("train_gru.py", "--suggest", "sams", "--category", "electronics", "--beam", "4", "--out", out,
            cwd=tmp, check=0)
    lines = [l.split()[:-1] for l in p.stdout.splitlines()[1:] if l.strip()]
    assert len(lines) >= 2 and all(l[0] == "samsung" for l in lines)
    # diversity: every suggestion comes from its own branch, and branching starts right after the
    # prefix here (the model is unsure between several electronics words after "samsung")
    assert len({" ".join(l) for l in lines}) == len(lines) and len({l[1] for l in lines}) >= 2
    electronics = {w for prod in __import__("train_gru").CATALOG["electronics"]["products"] for w in prod.split()}
    assert any(set(l[1:]) & electronics for l in lines)
    p = run("train_gru.py", "--suggest", "red", "--category", "cars", "--out", out, cwd=tmp, check=2)
    assert p.stderr.startswith("error: --category cars: unknown")


def test_suggest_serves_best_pt_not_the_newest_checkpoint(tmp):
    run("train_gru.py", *SMALL, "--max-steps", "10", "--save-every", "5", "--out", "b", cwd=tmp, check=0)
    ckpts = tmp / "b" / "checkpoints"
    # make best.pt and the newest checkpoint differ: as if validation got worse after step 5
    (ckpts / "best.pt").write_bytes((ckpts / "ckpt_step00000005.pt").read_bytes())
    (ckpts / "best.pt.sha256").write_bytes((ckpts / "ckpt_step00000005.pt.sha256").read_bytes())  # its checksum too
    served = lambda: run("train_gru.py", "--suggest", "red", "--category", "fashion", "--max-words", "3",
                         "--out", "b", cwd=tmp, check=0).stdout.splitlines()[0]
    assert served().startswith(f"model {Path('b') / 'checkpoints' / 'best.pt'} (step 5)")
    (ckpts / "best.pt").unlink()  # no best.pt: the newest checkpoint
    assert served().startswith(f"model {Path('b') / 'checkpoints' / 'ckpt_step00000010.pt'} (step 10)")


def test_max_words_is_the_flag_and_max_len_its_deprecated_alias(tmp):
    run("train_gru.py", *SMALL, "--max-steps", "2", "--max-words", "4", "--out", "w", cwd=tmp, check=0)
    assert read_json(tmp / "w" / "args.json")["settings"]["max_words"] == {"value": 4, "source": "flag"}
    new, old = (run("train_gru.py", "--suggest", "red", "--category", "fashion", flag, "1", "--out", "w", cwd=tmp,
                    check=0) for flag in ("--max-words", "--max-len"))
    assert "--max-len is the old name of --max-words" in old.stderr and not new.stderr
    assert old.stdout == new.stdout


def test_config_file_is_read_back_and_flags_override_it(tmp):
    run("memory_optimizer.py", "config", cwd=tmp, check=0)
    cfg = read_json(tmp / "optimal_config.json")["trainers"]["gru"]
    run("train_gru.py", "--dataset-size", "600", "--max-steps", "2", "--out", "c", cwd=tmp, check=0)
    s = read_json(tmp / "c" / "args.json")["settings"]
    assert s["batch_size"] == {"value": cfg["batch_size"]["value"], "source": "optimal_config.json"}
    run("train_gru.py", "--quick", "--dataset-size", "600", "--max-steps", "2", "--out", "q", cwd=tmp, check=0)
    s = read_json(tmp / "q" / "args.json")["settings"]  # --quick takes the quick column
    assert s["batch_size"] == {"value": cfg["batch_size"]["quick_value"], "source": "optimal_config.json"}
    run("train_gru.py", "--quick", "--dataset-size", "600", "--max-steps", "2", "--batch-size", "5",
        "--out", "c2", cwd=tmp, check=0)
    assert read_json(tmp / "c2" / "args.json")["settings"]["batch_size"] == {"value": 5, "source": "flag"}


def test_gru_mn_gradient_checkpointing_gives_the_same_gradients():
    import train_gru
    torch.manual_seed(0)
    model = train_gru.CadenceGRUMN(30, 3, emb=8, hidden=(12, 10), attn=(6, 5), context=7, dropout=0.0)
    x, cat = torch.randint(4, 30, (5, 9)), torch.tensor([0, 1, 2, 0, 1])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(x, cat)[0].square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_gru_mn_is_causal():
    """A word must not see later words: changing position 5 leaves outputs 0..4 unchanged."""
    import train_gru
    torch.manual_seed(0)
    model = train_gru.CadenceGRUMN(30, 3, emb=8, hidden=(12, 10), attn=(6, 5), context=7, dropout=0.0)
    x, cat = torch.randint(4, 30, (2, 8)), torch.tensor([0, 1])
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 30
    a, b = model(x, cat)[0], model(y, cat)[0]
    assert torch.allclose(a[:, :5], b[:, :5]) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_original_preset_trains_a_step(tmp):
    run("train_gru.py", "--preset", "original", "--dataset-size", "200", "--max-steps", "1", "--batch-size", "4",
        "--grad-accum", "1", "--grad-checkpointing", "--precision", "fp32", "--out", "o", cwd=tmp, check=0)
    s = read_json(tmp / "o" / "summary.json")
    assert s["params"] > 40_000_000 and s["steps"] == 1


# -- user mistakes: one line on stderr, exit 2, nothing already saved is touched ----------------


BAD_CSV = {
    "empty.csv": "",
    "nocol.csv": "query,cat\nred shoes,fashion\n",
    "ragged.csv": "text,category\n" + "red shoes,fashion\n" * 20 + "a,b,c,d\n",
    "few.csv": "text,category\nred shoes,fashion\n",
    "cars.csv": "text,category\n" + "red sports car,cars\n" * 20,
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    run("train_gru.py", *SMALL, "--max-steps", "5", "--out", "run", cwd=d, check=0)
    return d


@pytest.mark.parametrize("flags,expect", [
    (["--data", "missing.csv"], "--data missing.csv: file not found; check the path"),
    (["--data", "run"], "--data run: a folder; give a .csv, .tsv or .jsonl file"),
    (["--data", "empty.csv"], "empty"),
    (["--data", "nocol.csv"], "missing column(s) text, category"),
    (["--data", "ragged.csv", "--bad-rows", "fail"],
     "line 22: 4 fields, expected 2 (quote texts that contain the delimiter) (--bad-rows skip drops such rows)"),
    (["--data", "few.csv"], "only 1 usable rows"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "-2"], "--grad-accum"),
    (["--lr", "-1"], "--lr"),
    (["--clip", "-1"], "--clip: must be 0 or a positive number, got -1"),
    (["--epochs", "zero"], "--epochs"),
    (["--precision", "fp8"], "--precision"),
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--device", "cuda"], "--device cuda"),
    (["--val-frac", "0.9"], "--val-frac"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--warmup", "-1"], "--warmup"),
    (["--config", "nope.json"], "--config nope.json"),
    (["--resume", "nope.pt"], "--resume nope.pt: file not found; give a ckpt_step*.pt or best.pt"),
    (["--resume", "afile"], "--resume afile: not a loadable checkpoint (damaged, or not a file torch.save wrote); "
                            "give a ckpt_step*.pt"),
    (["--resume", "run"], "--resume run: a folder; give a ckpt_step*.pt or best.pt from a run's checkpoints/ "
                          "folder, or --out RUN to resume a run's newest"),
    (["--preset", "original"], "is a --preset optimized run"),     # resuming run/ with another model
    (["--data", "cars.csv"], "trained on other categories"),       # ... or with other categories
    (["--out", "afile/run"], "--out afile/run"),
])
def test_bad_input_exits_2_with_one_line_and_keeps_saved_files(saved_run, flags, expect):
    d = saved_run
    for name, text in BAD_CSV.items():
        (d / name).write_text(text)
    (d / "afile").write_text("not a folder")
    before = tree_digest(d / "run")
    out = [] if "--out" in flags else ["--out", "run"]
    p = call("train_gru.py", "--quick", *flags, *out, cwd=d)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], p.stderr
    assert "Traceback" not in p.stdout + p.stderr
    assert tree_digest(d / "run") == before


def test_resume_from_a_checkpoint_carrying_a_callable_is_refused(saved_run):
    d = saved_run
    evil = d / "evil.pt"
    code = ("import os, torch\n"
            "class E:\n    def __reduce__(self): return (os.system, ('touch PWNED',))\n"
            f"torch.save({{'model': E()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=d)
    p = run("train_gru.py", "--quick", "--resume", "evil.pt", "--out", "run2", cwd=d, check=2)
    assert "not a loadable checkpoint" in p.stderr and not (d / "PWNED").exists()


LM_TINY = ["--n-layer", "1", "--d-model", "16", "--n-head", "2", "--seq-len", "16", "--batch-size", "2",
           "--eval-tokens", "64", "--max-steps", "1"]


@pytest.fixture(scope="module")
def other_runs(saved_run):
    """Beside saved_run's run/: an LM run folder, its checkpoints alone (no status.json), and two
    loadable checkpoints no trainer wrote (no args["trainer"] to refuse them by)."""
    d = saved_run
    run("train_lm.py", *LM_TINY, "--out", "lmrun", cwd=d, check=0)
    shutil.copytree(d / "lmrun" / "checkpoints", d / "lmckpts" / "checkpoints")
    torch.save({"model": {}, "step": 3}, d / "foreign.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    return d


@pytest.mark.parametrize("flags,expect", [
    (["--out", "lmrun"], "--out lmrun: made by train_lm.py, not train_gru.py"),
    (["--out", "lmckpts"], "ckpt_step00000001.pt: made by train_lm.py, not train_gru.py"),
    (["--resume", "lmrun/checkpoints/best.pt"], "--resume lmrun/checkpoints/best.pt: made by train_lm.py"),
    (["--resume", "foreign.pt"], "foreign.pt is not a train_gru.py checkpoint"),
    (["--resume", "tensor.pt"], "tensor.pt is not a train_gru.py checkpoint"),
    (["--suggest", "red", "--out", "lmrun"], "--out lmrun: lmrun/checkpoints/best.pt is not a train_gru.py checkpoint"),
    (["--suggest", "red", "--out", "run", "--resume", "lmrun/checkpoints/best.pt"],
     "--resume lmrun/checkpoints/best.pt: made by train_lm.py, not train_gru.py"),
    (["--suggest", "red", "--out", "run", "--resume", "foreign.pt"], "foreign.pt is not a train_gru.py checkpoint"),
])
def test_another_trainers_run_or_checkpoint_is_one_error_line(other_runs, flags, expect):
    d = other_runs
    before = {name: tree_digest(d / name) for name in ("run", "lmrun", "lmckpts")}
    out = [] if "--out" in flags else ["--out", "new"]
    p = call("train_gru.py", *SMALL, *flags, *out, cwd=d)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], p.stderr
    assert {name: tree_digest(d / name) for name in before} == before and not (d / "new").exists()


def patched(tmp, patch):
    """A script that runs train_gru.py after `patch` (Python source) replaced part of it."""
    path = tmp / "patched.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport shutil, torch\nimport common, train_gru\n"
                    f"{patch}\ncommon.run_main(train_gru.main)\n")
    return path


# a validation batch above 16 rows "runs out of memory" (training's 8-row micro-batches do not)
OOM_IN_EVAL = """
def loss_fn(model, mb, device, real=train_gru.loss_fn):
    if not model.training and len(mb["x"]) > 16:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(model, mb, device)
train_gru.loss_fn = loss_fn
"""


def test_out_of_memory_in_validation_halves_its_batch_and_changes_no_figure(tmp):
    flags = [*SMALL, "--max-steps", "6", "--eval-every", "3"]
    run("train_gru.py", *flags, "--out", "ref", cwd=tmp, check=0)
    p = run(patched(tmp, OOM_IN_EVAL), *flags, "--out", "oom", cwd=tmp, check=0)
    # 256 -> 128 -> 64 -> 32 -> 16 once; the later evaluations start at 16
    assert p.stdout.count("out of memory in evaluation: its batch halved to") == 4, p.stdout
    assert "its batch halved to 16; evaluating again" in (tmp / "oom" / "train.log").read_text()
    assert read_json(tmp / "oom" / "status.json")["state"] == "finished"
    ref, got = ([r["val_loss"] for r in metrics(tmp / name) if "val_loss" in r] for name in ("ref", "oom"))
    assert len(ref) == 2 and got == pytest.approx(ref, rel=1e-6)
    assert read_json(tmp / "oom" / "summary.json")["value"] == pytest.approx(
        read_json(tmp / "ref" / "summary.json")["value"], rel=1e-6)


def test_low_disk_warning_goes_to_the_run_log(tmp):
    low = "real = shutil.disk_usage\nshutil.disk_usage = lambda p: real(p)._replace(free=1)  # yet writes succeed"
    run(patched(tmp, low), *SMALL, "--max-steps", "4", "--save-every", "2", "--out", "r", cwd=tmp, check=0)
    assert "warning: 0 MB free in" in (tmp / "r" / "train.log").read_text()


# -- background runs (start / status / monitor / stop of a gru run) moved with the run manager to
# memory_optimizer.py: tests/test_memory_optimizer.py::test_background_start_status_monitor_stop


def test_resume_with_a_smaller_micro_batch_continues_the_same_run(tmp):
    """The seeds' remedy after an out-of-memory error: resume with --batch-size 1 --grad-accum 8.
    The typed pair wins over the checkpoint's 2 x 4 (same effective batch: same data) and the run
    ends within float rounding of the uninterrupted one. --dropout 0: masks are drawn per
    micro-batch, so with dropout the two runs agree in distribution, not number for number."""
    flags = ["--quick", "--dataset-size", "1500", "--dropout", "0", "--max-steps", "20", "--save-every", "5",
             "--eval-every", "10"]
    run("train_gru.py", *flags, "--batch-size", "2", "--grad-accum", "4", "--out", "ref", cwd=tmp, check=0)
    proc = popen("train_gru.py", *flags, "--batch-size", "2", "--grad-accum", "4", "--out", "small", cwd=tmp)
    wait_for(lambda: step_reached(tmp / "small" / "status.json", 7), what="step 7")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = run("train_gru.py", *flags, "--batch-size", "1", "--grad-accum", "8", "--out", "small", cwd=tmp, check=0)
    assert "resumed from" in p.stdout and "batch 1 x 8 accumulation" in p.stdout
    assert "1 x 8 (--batch-size and --grad-accum typed), for the checkpoint's 2 x 4: the same effective batch" in p.stdout
    assert read_json(tmp / "small" / "args.json")["chosen"]["micro_batch"] == 1
    ref, got = weights(tmp / "ref"), weights(tmp / "small")
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 1e-4
    assert read_json(tmp / "small" / "summary.json")["value"] == pytest.approx(
        read_json(tmp / "ref" / "summary.json")["value"], rel=1e-4)


def test_resume_with_a_new_effective_batch_goes_on_and_says_so(tmp):
    """Issue 31: a new effective batch on resume is allowed and said. 2 x 4 (8 queries a step, 169 steps an
    epoch of 1,350 training queries) killed after step 10 and resumed at 4 x 4: step 10 of 169 is step 5 of 85 (the same
    share of the epoch and of the schedule), and the run ends at 85 steps, its model as good as an
    uninterrupted 4 x 4 run's (validation perplexity within 10 %; the 2 x 4 run, twice the steps, reaches 22.6
    where these reach 29-30)."""
    flags = ["--quick", "--dataset-size", "1500", "--epochs", "1", "--save-every", "10", "--log-every", "5"]
    run("train_gru.py", *flags, "--batch-size", "2", "--grad-accum", "4", "--max-steps", "10", "--out", "r",
        cwd=tmp, check=0)
    (tmp / "r" / "summary.json").unlink()  # as if killed after the checkpoint at step 10
    run("train_gru.py", *flags, "--batch-size", "4", "--grad-accum", "4", "--out", "ref", cwd=tmp, check=0)
    p = run("train_gru.py", *flags, "--batch-size", "4", "--grad-accum", "4", "--out", "r", cwd=tmp, check=0)
    assert "4 x 4 (--batch-size and --grad-accum typed), for the checkpoint's 2 x 4: a new effective batch (was 8)" in p.stdout, p.stdout
    assert "new effective batch: step 10 of 169 is now step 5 of 85 (batch 5 of 85 in this epoch)" in p.stdout
    assert re.search(r"step +(\d+)/85 \|", p.stdout.split("new effective batch:")[1])[1] == "10"  # 5 steps on
    got, ref = read_json(tmp / "r" / "summary.json"), read_json(tmp / "ref" / "summary.json")
    assert got["steps"] == ref["steps"] == 85
    assert got["value"] == pytest.approx(ref["value"], rel=0.1), (got["value"], ref["value"])
    # metrics.jsonl counts in the new steps: the old record at 10 (now 5) went, as a killed run's would
    assert [r["step"] for r in metrics(tmp / "r") if "loss" in r][:3] == [5, 10, 15]


def test_rerun_without_out_resumes_the_killed_run_and_seed_spellings(tmp):
    """Seed 000: "automatic resume on restart". The same command, no --out, killed after its first
    checkpoint and run again, goes on in the same runs/ folder and ends as an uninterrupted run;
    another command (here another --seed) or --no-resume starts a new folder."""
    flags = [*SMALL, "--max-steps", "30", "--save-every", "5", "--eval-every", "10"]
    run("train_gru.py", *flags, "--out", "ref", cwd=tmp, check=0)
    proc = popen("train_gru.py", *flags, cwd=tmp)
    wait_for(lambda: any(step_reached(d / "status.json", 12) for d in (tmp / "runs").glob("gru-*")), what="step 12")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = (tmp / "runs").glob("gru-*")
    p = run("train_gru.py", *flags, cwd=tmp, check=0)
    assert p.stdout.startswith(f"resuming {Path('runs') / killed.name}, the newest unfinished run of this command")
    assert [d.name for d in (tmp / "runs").iterdir()] == [killed.name] and "resumed from" in p.stdout
    ref, got = weights(tmp / "ref"), weights(killed)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # another seed is another run: a new folder
    run("train_gru.py", *flags, "--max-steps", "2", "--seed", "7", cwd=tmp, check=0)
    assert len(list((tmp / "runs").iterdir())) == 2
    # the seeds' spellings: --checkpoint_dir is --out, bare --resume the newest checkpoint there
    p = run("train_gru.py", *flags, "--checkpoint_dir", "ref", "--resume", cwd=tmp, check=0)
    assert "this run had already finished at step 30" in p.stdout
    p = run("train_gru.py", "--config", "original", cwd=tmp, check=2)
    assert p.stderr.strip() == "error: --config original: no such file; original is a preset here: use --preset original"


# -- --eval-only and --tensorboard (issue 31) -----------------------------------------------------

EVAL_FLAGS = [*SMALL, "--max-steps", "12", "--eval-every", "5", "--log-every", "5"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """A small run under runs/ (so a command without --out finds it), validated at steps 5, 10 and 12,
    with --tensorboard where the package is installed."""
    import importlib.util
    d = tmp_path_factory.mktemp("evalonly")
    tb = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []
    run("train_gru.py", *EVAL_FLAGS, *tb, "--out", Path("runs") / "g", cwd=d, check=0)
    return d, d / "runs" / "g"


def test_eval_only_reproduces_the_summary_and_writes_nothing_else(eval_run):
    """summary.json's `value` is report()'s validation of the weights at the last step, which the loop
    always checkpoints (ckpt_step<last>.pt, the newest, kept by rotation); `best_value` is the lowest
    validation, whose weights are best.pt. --eval-only --resume <last> gives `value` back, plain
    --eval-only (best.pt) `best_value`, both to 1e-6 on figures rounded as the summary rounds them
    (4 decimals; val_loss as metrics.jsonl rounds it, 6), and the run folder is byte-identical after."""
    d, out = eval_run
    s = read_json(out / "summary.json")
    last = out / "checkpoints" / f"ckpt_step{s['steps']:08d}.pt"
    before = tree_digest(out, skip="eval.json")
    p = run("train_gru.py", *EVAL_FLAGS, "--eval-only", "--out", out, "--resume", last, cwd=d, check=0)
    e = read_json(out / "eval.json")
    assert e["metric"] == "val_ppl" and e["checkpoint"] == str(last.resolve()) and e["step"] == s["steps"]
    assert abs(round(e["val_ppl"], 4) - s["value"]) <= 1e-6 and e["value"] == s["value"], (e, s)
    final_val = [r for r in metrics(out) if "val_loss" in r][-1]
    assert final_val["step"] == s["steps"] and abs(round(e["val_loss"], 6) - final_val["val_loss"]) <= 1e-6
    assert e["unigram_ppl"] == s["unigram_ppl"]
    # the training run's lines, as its report prints them
    assert f"step {s['steps']}: val loss {e['val_loss']:.4f}, perplexity {e['val_ppl']:.2f} (unigram" in p.stdout
    assert "eval: val perplexity" in p.stdout and "resumed" not in p.stdout and "train:" not in p.stderr
    # no --out: the newest gru run under runs/; its best.pt
    p = run("train_gru.py", *EVAL_FLAGS, "--eval-only", cwd=d, check=0)
    e = read_json(out / "eval.json")
    assert e["checkpoint"] == str((out / "checkpoints" / "best.pt").resolve())
    assert abs(round(e["val_ppl"], 4) - s["best_value"]) <= 1e-6, (e, s)
    assert tree_digest(out, skip="eval.json") == before  # status.json, metrics.jsonl, train.log, checkpoints/
    assert sorted(f.name for f in d.iterdir()) == ["runs"] and [f.name for f in (d / "runs").iterdir()] == ["g"]


def test_what_a_run_saved_stays_through_reruns_mistakes_and_plans(eval_run, tmp):
    """Nothing saved is touched (a new user's review): a finished run re-run with other data flags (said,
    with how to train it longer; its args.json stays), a flag its checkpoint cannot honour (exit 2), --plan in
    its folder: its status.json stays byte for byte. --plan without --out never takes over a run, and a command without
    --out never picks a plan's folder. Bare --resume with --no-resume is refused."""
    out = tmp / "runs" / "g"
    shutil.copytree(eval_run[1], out)
    status, args = (out / "status.json").read_bytes(), (out / "args.json").read_bytes()
    p = run("train_gru.py", *EVAL_FLAGS, "--dataset-size", "1200", "--out", out, cwd=tmp, check=0)
    assert "typed, and not what the checkpoint trained with: --dataset-size 1200 (it had 1500)" in p.stdout
    assert "this run had already finished at step 12" in p.stdout and "a larger --epochs or --max-steps" in p.stdout
    assert (out / "args.json").read_bytes() == args  # it still describes the saved model
    p = run("train_gru.py", *EVAL_FLAGS, "--optim", "adamw8bit", "--out", out, cwd=tmp, check=2)
    assert p.stderr.startswith("error: the checkpoint being resumed was trained with AdamW")
    p = run("train_gru.py", *EVAL_FLAGS, "--plan", "--out", out, cwd=tmp, check=0)
    assert "memory plan:" in p.stdout and (out / "status.json").read_bytes() == status
    p = run("train_gru.py", *EVAL_FLAGS, "--plan", cwd=tmp, check=0)
    (plan,) = [d for d in (tmp / "runs").iterdir() if d != out]
    assert f"a new run folder: {Path('runs') / plan.name}" in p.stdout and read_json(plan / "status.json")["state"] == "planned"
    run("train_gru.py", *EVAL_FLAGS, "--eval-only", cwd=tmp, check=0)
    assert (out / "eval.json").exists() and not (plan / "eval.json").exists()
    p = run("train_gru.py", *EVAL_FLAGS, "--resume", "--no-resume", "--out", out, cwd=tmp, check=2)
    assert p.stderr.strip() == "error: --resume --no-resume: pick one (resume, or start over)"
    assert (out / "status.json").read_bytes() == status


def test_resource_efficient_validates_at_the_micro_batch_and_eval_only_follows(eval_run, tmp):
    """--resource-efficient validates at the micro-batch instead of 256 queries (their logits were the
    GRU's largest part of the memory a run adds: docs/run-contract.md); --eval-only scores such a run at
    its batch too, so it still gives summary.json's value back."""
    assert read_json(eval_run[1] / "args.json")["chosen"]["eval_batch"] == 256  # the standard run
    p = run("train_gru.py", *EVAL_FLAGS, "--resource-efficient", "--out", "re", cwd=tmp, check=0)
    assert re.search(r"eval batch +256 -> micro-batch", p.stdout), p.stdout
    chosen, s = read_json(tmp / "re" / "args.json")["chosen"], read_json(tmp / "re" / "summary.json")
    assert chosen["eval_batch"] == chosen["micro_batch"] == 8  # --batch-size 8, typed: kept, not halved
    last = tmp / "re" / "checkpoints" / f"ckpt_step{s['steps']:08d}.pt"
    run("train_gru.py", *EVAL_FLAGS, "--eval-only", "--out", "re", "--resume", last, cwd=tmp, check=0)
    assert read_json(tmp / "re" / "eval.json")["value"] == s["value"]


def test_eval_only_on_the_same_data_split_another_way_is_refused(eval_run):
    """A new user's review: the built-in queries at another --dataset-size (--quick's, left off) begin with the
    same queries, so that validation split held ~45 % training queries and read 7.01 where the run's own reads
    7.40. Refused in one line, with the fix; nothing written."""
    d, out = eval_run
    before = tree_digest(out)
    other = [f if f != "1500" else "1400" for f in EVAL_FLAGS]  # --dataset-size 1400: another split
    p = call("train_gru.py", *other, "--eval-only", "--out", out, cwd=d)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: --eval-only: --dataset-size 1400 (trained with 1500): that validation split would hold queries "
        f"{out / 'checkpoints' / 'best.pt'} trained on; repeat the training command's data flags"), p.stderr
    p = call("train_gru.py", "--eval-only", "--out", out, cwd=d)  # the training command without --quick
    assert p.returncode == 2 and p.stderr.strip().endswith("data flags (--quick included)"), p.stderr
    assert tree_digest(out) == before


def test_eval_only_with_quick_of_a_run_trained_without_it_is_refused(tmp):
    run("train_gru.py", "--max-steps", "2", "--out", "std", cwd=tmp, check=0)
    p = call("train_gru.py", "--quick", "--eval-only", "--out", "std", cwd=tmp)
    assert p.returncode == 2 and "--dataset-size 5000 (trained with 10000)" in p.stderr, p.stderr
    assert p.stderr.strip().endswith("data flags (without --quick)")


@pytest.mark.parametrize("flags,expect", [
    (["--out", "empty"], "--out empty: no checkpoint there; train first"),
    (["--out", "missing"], "--out missing: no checkpoint there; train first"),
    ([], "--eval-only: no run folder given and none found under runs/; pass --out RUN"),
    (["--resume", "x.pt"], "--eval-only --resume x.pt: pass --out RUN too"),
])
def test_eval_only_without_a_checkpoint_is_one_error_line_and_writes_nothing(tmp, flags, expect):
    (tmp / "empty").mkdir()
    p = call("train_gru.py", *SMALL, "--eval-only", *flags, cwd=tmp)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expect), p.stderr
    assert sorted(f.name for f in tmp.iterdir()) == ["empty"] and not list((tmp / "empty").iterdir())


def test_tensorboard_gets_the_log_lines_and_every_validation(eval_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out = eval_run
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/queries_per_s", "eval/val_ppl", "eval/val_loss"} <= set(tags), tags
    assert "eval/loss" not in tags  # per-step training records reach the board through log_step only
    assert [e.step for e in ea.Scalars("eval/val_ppl")] == [5, 10, 12]
    assert [e.step for e in ea.Scalars("train/loss")] == [5, 10, 12]
    vals = {r["step"]: r["val_ppl"] for r in metrics(out) if "val_ppl" in r}
    assert [e.value for e in ea.Scalars("eval/val_ppl")] == pytest.approx([vals[5], vals[10], vals[12]], abs=1e-3)
