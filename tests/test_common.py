"""Unit tests of the shared functions in common.py."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
from conftest import REPO, metrics
import train_gru
from common import UserError

DEV = torch.device("cpu")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return train_gru.CadenceGRU(vocab=50, n_cats=3, emb=8, cat_emb=4, hidden=16, dropout=0.0)


def ragged_batch(n=12, seed=0):
    """Sequences of very different lengths, so micro-batches hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    lens = [2 + (i * 7) % 11 for i in range(n)]
    x = torch.zeros(n, max(lens), dtype=torch.long)
    y = torch.zeros_like(x)
    for i, L in enumerate(lens):
        x[i, :L] = torch.randint(4, 50, (L,), generator=g)
        y[i, :L] = torch.randint(4, 50, (L,), generator=g)
    return {"x": x, "y": y, "cat": torch.arange(n) % 3}


def loss_fn(model, mb):
    return train_gru.loss_fn(model, mb, DEV)


def one_step(micro_bs, fn=loss_fn, batch=None):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, n, used = common.train_step(model, opt, scaler, batch or ragged_batch(), fn, micro_bs,
                                      clip=None, device=DEV, amp_dtype=None, log=lambda m: None)
    return model, loss, n, used


def max_diff(m1, m2):
    return max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))


def test_accumulation_is_exact_with_ragged_micro_batches():
    full, loss_full, n_full, _ = one_step(12)
    for k in (2, 3, 5):
        acc, loss_acc, n_acc, _ = one_step(k)
        assert n_acc == n_full
        assert loss_acc == pytest.approx(loss_full, rel=1e-6)
        assert max_diff(full, acc) < 1e-6, f"micro-batch {k}"


def test_clip_0_is_off_and_clip_c_caps_the_gradient_norm():
    """--clip 0 parses (it is the off switch; --resource-efficient's sparse classifier uses it) and leaves the
    step the raw gradient's; --clip 0.1 scales a larger gradient (0.22) down to norm 0.1 (SGD, lr 1: the update is it)."""
    parser = common.make_parser("t", "gru", epochs=1, lr=1e-3, effective_batch=8)
    assert parser.parse_args(["--clip", "0"]).clip == 0.0
    before = [p.detach().clone() for p in tiny_model().parameters()]
    updates = {}
    for clip in (0.0, 0.1):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        common.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), ragged_batch(), loss_fn, 12,
                          clip=clip, device=DEV, amp_dtype=None, log=lambda m: None)
        updates[clip] = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    raw = one_step(12)[0]  # clip=None: no clipping
    assert torch.equal(updates[0.0], torch.cat([(b - p.detach()).flatten() for b, p in zip(before, raw.parameters())]))
    assert updates[0.0].norm() > 0.2 and updates[0.1].norm() == pytest.approx(0.1, rel=1e-4)


def test_naive_mean_of_micro_means_would_differ():
    """Guards the test above: averaging per-micro-batch means (the usual bug) is measurably off."""
    def per_micro_mean(model, mb):
        loss, n = loss_fn(model, mb)
        return loss / n * 1000, torch.tensor(1000)  # every micro-batch weighs the same
    full, *_ = one_step(12)
    naive, *_ = one_step(3, per_micro_mean)
    assert max_diff(full, naive) > 1e-4


def test_injected_oom_halves_micro_batch_and_keeps_the_step_exact():
    calls = []

    def oom_above_3(model, mb):
        calls.append(len(mb["x"]))
        if len(mb["x"]) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss_fn(model, mb)
    ref, loss_ref, _, _ = one_step(12)
    got, loss_got, _, used = one_step(12, oom_above_3)
    assert used == 3 and calls[:3] == [12, 6, 3]
    assert loss_got == pytest.approx(loss_ref, rel=1e-6)
    assert max_diff(ref, got) < 1e-6


def test_oom_after_unscale_with_an_enabled_grad_scaler_retries_cleanly(monkeypatch):
    """fp16 path: an OOM after scaler.unscale_ (e.g. in clipping) must not leave the scaler
    thinking this step was already unscaled."""
    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_oom_once(params, max_norm):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real_clip(params, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_oom_once)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    loss, n, used = common.train_step(model, opt, scaler, ragged_batch(), loss_fn, 12, clip=1.0,
                                      device=DEV, amp_dtype=None, log=lambda m: None)
    assert used == 6 and len(calls) == 2 and scaler.get_scale() == 1024.0  # stepped, no inf found


def test_memoryerror_counts_as_oom_but_other_errors_propagate():
    def mem_err(model, mb):
        if len(mb["x"]) > 6:
            raise MemoryError()
        return loss_fn(model, mb)
    assert one_step(12, mem_err)[3] == 6

    def bug(model, mb):
        raise ValueError("a real bug must not be retried")
    with pytest.raises(ValueError):
        one_step(12, bug)


def _args(**kw):
    base = dict(effective_batch=64, batch_size="auto", grad_accum="auto", quick=False,
                resource_efficient=False, ram_threshold=85.0, gpu_threshold=90.0, gpu_memory=None, max_memory=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_auto_batch_probe_halves_until_it_fits_and_keeps_effective_batch():
    seen = []

    def probe(bs):
        seen.append(bs)
        if bs > 2:
            raise MemoryError()
        return 1
    args = _args()
    sources = {"batch_size": "default", "grad_accum": "default"}
    micro, accum, why = common.choose_batch_size(args, sources, DEV, probe, log=lambda m: None)
    start = common.table_batch_size("cpu", False)[0]
    assert micro == 2 and seen[0] == start and seen[-1] == 2
    assert micro * accum == 64 and sources["batch_size"] == "auto"
    assert "halved to 2" in why


def test_auto_batch_probe_rejects_a_batch_over_the_ram_threshold():
    huge = 10 * 2**40  # "needs" 10 TiB: over any threshold, so the probe must halve to 1
    micro, accum, _ = common.choose_batch_size(_args(), {"batch_size": "default", "grad_accum": "default"},
                                               DEV, lambda bs: huge if bs > 1 else 1, log=lambda m: None)
    assert (micro, accum) == (1, 64)


def test_explicit_grad_accum_with_auto_batch_scales_when_probe_halves():
    args = _args(grad_accum=4)
    micro, accum, _ = common.choose_batch_size(args, {"batch_size": "default", "grad_accum": "flag"}, DEV,
                                               lambda bs: (_ for _ in ()).throw(MemoryError()) if bs > 4 else 1,
                                               log=lambda m: None)
    start = common.table_batch_size("cpu", False)[0]
    assert micro * accum == start * 4


@pytest.mark.parametrize("ram,quick,want", [(6, True, 4), (6, False, 2), (12, True, 8), (12, False, 4),
                                            (32, True, 16), (32, False, 8)])
def test_ram_table(ram, quick, want):
    assert common.table_batch_size("cpu", quick, ram_gb=ram)[0] == want


def test_precision_on_cpu_scaler_off_and_fp16_refused():
    for prec, dtype in (("auto", None), ("fp32", None), ("bf16", torch.bfloat16)):
        dev, amp, scaler, why = common.setup_device(argparse.Namespace(device="cpu", precision=prec))
        assert dev.type == "cpu" and amp == dtype and not scaler.is_enabled()
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        common.setup_device(argparse.Namespace(device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda"):
            common.setup_device(argparse.Namespace(device="cuda", precision="auto"))


def test_a_config_precision_that_does_not_fit_the_device_is_decided_as_auto():
    """A GPU machine's optimal_config.json (bf16) read on a CPU: precision auto, so measure_precision times it
    (before, the source stayed "optimal_config.json", nothing was timed, and the line promised a timing)."""
    args, sources = argparse.Namespace(device="cpu", precision="bf16"), {"precision": "optimal_config.json"}
    dev, amp, _, why = common.setup_device(args, sources)
    assert (amp, args.precision, sources["precision"]) == (None, "fp32", "auto"), (why, sources)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp):
    common.seed_everything(3)
    state = common.rng_state()
    torch.save({"rng": state}, tmp / "c.pt")
    import random
    import numpy as np
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    common.seed_everything(99)
    common.set_rng_state(common.load_checkpoint(tmp / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_rotation_keeps_last_k_plus_best_and_never_the_resumed_one(tmp):
    protect = None
    for step in range(1, 8):
        p = common.save_checkpoint(tmp, step, {"step": step}, keep=3, protect=protect, best=(step == 2))
        if step == 1:
            protect = p
    names = sorted(f.name for f in (tmp / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "ckpt_step00000001.pt", "ckpt_step00000005.pt",
                     "ckpt_step00000006.pt", "ckpt_step00000007.pt"]
    # every kept file has its checksum beside it, and a rotated-out one takes its checksum along
    assert sorted(f.name for f in (tmp / "checkpoints").glob("*.sha256")) == [n + ".sha256" for n in names]
    assert common.load_checkpoint(tmp / "checkpoints" / "best.pt")["step"] == 2
    assert not list((tmp / "checkpoints").glob("*.tmp"))


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp):
    for step in (10, 20):
        common.save_checkpoint(tmp, step, {"step": step, "w": torch.randn(1000)}, keep=3)
    newest = tmp / "checkpoints" / "ckpt_step00000020.pt"
    newest.write_bytes(newest.read_bytes()[:500])  # a write cut short
    logs = []
    args = argparse.Namespace(resume=None, no_resume=False)
    state, path = common.find_checkpoint(tmp, args, logs.append)
    assert state["step"] == 10 and path.name == "ckpt_step00000010.pt"
    assert any("unreadable" in m for m in logs)


def test_a_flipped_byte_inside_a_tensor_is_caught_and_the_previous_checkpoint_used(tmp):
    """The zip format's checks pass such a file (torch.load reads it, with one wrong weight): only
    the SHA-256 saved beside it catches it (issue 15: a GRU resumed on wrong weights)."""
    for step in (10, 20):
        common.save_checkpoint(tmp, step, {"step": step, "w": torch.zeros(100_000)}, keep=3, best=step == 20)
    newest = tmp / "checkpoints" / "ckpt_step00000020.pt"
    data = bytearray(newest.read_bytes())
    at = data.find(bytes(4000))  # inside the zeros of the tensor's storage
    data[at + 2000] ^= 0x40
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["w"].abs().sum() > 0  # loads, silently wrong
    logs = []
    state, path = common.find_checkpoint(tmp, argparse.Namespace(resume=None, no_resume=False), logs.append)
    assert state["step"] == 10 and path.name == "ckpt_step00000010.pt"
    assert any("ckpt_step00000020.pt is unreadable (SHA-256" in m for m in logs), logs
    with pytest.raises(UserError, match="not a loadable checkpoint .*ChecksumMismatch"):
        common.find_checkpoint(tmp, argparse.Namespace(resume=str(newest), no_resume=False), logs.append)
    # best.pt damaged the same way: the served model is the newest step checkpoint that verifies
    best = tmp / "checkpoints" / "best.pt"
    best.write_bytes(bytes(data))
    state, path = common.load_run_model(tmp, "--out", "gru", "w")
    assert state["step"] == 10 and torch.count_nonzero(state["w"]) == 0


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


def test_checkpoint_with_pickled_callable_is_refused(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    common.save_checkpoint(tmp, 5, {"step": 5}, keep=3)
    torch.save({"step": 9, "payload": Evil()}, tmp / "checkpoints" / "ckpt_step00000009.pt")
    state, path = common.find_checkpoint(tmp, argparse.Namespace(resume=None, no_resume=False), lambda m: None)
    assert state["step"] == 5  # the evil newest one was skipped, not executed
    with pytest.raises(UserError, match="not a loadable checkpoint") as e:
        common.find_checkpoint(tmp, argparse.Namespace(resume=str(tmp / "checkpoints" / "ckpt_step00000009.pt"),
                                                       no_resume=False), lambda m: None)
    assert "pickled code, which is never run" in str(e.value) and "weights_only=False" not in str(e.value)
    assert not (tmp / "PWNED").exists()


def test_settings_sources_config_and_flags(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    cfg = {"trainers": {"gru": {"batch_size": {"value": 6, "reason": "test"},
                                "precision": {"value": "fp32", "reason": "test"},
                                "seq_len": {"value": 99, "reason": "not a gru setting"}}}}
    (tmp / "optimal_config.json").write_text(json.dumps(cfg))
    args, src = common.resolve_settings(train_gru.parser, ["--precision", "bf16", "--lr=0.01"], lambda m: None)
    assert (args.batch_size, src["batch_size"]) == (6, "optimal_config.json")
    assert (args.precision, src["precision"]) == ("bf16", "flag")
    assert (args.lr, src["lr"]) == (0.01, "flag")
    assert src["epochs"] == "default" and not hasattr(args, "seq_len")


def test_resource_efficient_preset_and_flags_win(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    monkeypatch.setattr(common, "keep_heap_small", lambda: True)  # not in this pytest process
    logs = []
    args, src = common.resolve_settings(train_gru.parser, ["--resource-efficient", "--save-every", "40"],
                                        logs.append)
    assert (args.ram_threshold, args.gpu_threshold, args.mem_check_every) == (70.0, 75.0, 15.0)
    assert args.grad_checkpointing and not args.pin_memory
    assert args.save_every == 40 and src["save_every"] == "flag"
    assert any("save_every" in m and "kept" in m for m in logs)
    assert any("mmap threshold" in m for m in logs)


HEAP = """
import sys, psutil, torch, common
on = sys.argv[1] == "on" and common.keep_heap_small()
big = torch.ones(8 << 20, dtype=torch.uint8); del big  # glibc now keeps blocks under 8 MB in the heap
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
ts = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(6)]  # 12 MB, written to
del ts
print(on, rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_heap_small_returns_freed_tensors_to_the_os():
    kept = {}
    for mode in ("off", "on"):
        p = subprocess.run([sys.executable, "-c", HEAP, mode], capture_output=True, text=True,
                           cwd=REPO, check=True)
        on, mb = p.stdout.split()
        kept[mode] = (on == "True", float(mb))
    if not kept["on"][0]:
        pytest.skip("not glibc: mallopt unavailable")
    assert kept["off"][1] > 8, kept  # the default: 12 MB of freed tensors stay in the process
    assert kept["on"][1] < 2, kept  # fixed threshold: they go back to the OS


def test_missing_explicit_config_is_a_user_error(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    with pytest.raises(UserError, match="--config"):
        common.resolve_settings(train_gru.parser, ["--config", "nope.json"], lambda m: None)
    # the reason in words, not a Python exception's repr (a new user's review)
    for text, why in (("{not json", r"\(not JSON: Expecting property name enclosed in double quotes: line 1"),
                      ("[1, 2]", r"\(no trainers.gru section\)"), ('{"batch_size": 8}', r"\(no trainers.gru section\)"),
                      ('{"trainers": {"gru": 3}}', r"\(no trainers.gru section\)")):
        (tmp / "bad.json").write_text(text)
        with pytest.raises(UserError, match=r"^--config bad.json: not a valid optimal_config.json " + why):
            common.resolve_settings(train_gru.parser, ["--config", "bad.json"], lambda m: None)


def test_truncate_metrics_drops_records_after_the_checkpoint(tmp):
    for s in range(1, 8):
        common.append_metrics(tmp, {"step": s, "loss": 1.0 / s})
    common.truncate_metrics(tmp, 4)
    assert [r["step"] for r in metrics(tmp)] == [1, 2, 3, 4]


def test_resume_and_no_resume_together_are_refused(tmp):
    args = argparse.Namespace(resume="x.pt", no_resume=True, out=str(tmp / "r"), trainer="gru")
    with pytest.raises(UserError, match="--resume x.pt --no-resume: pick one"):
        common.open_run(args, {})
    assert not (tmp / "r").exists()


def test_leftover_temp_files_are_removed_and_a_corrupt_status_json_is_no_traceback(tmp):
    """A kill during a save leaves *.tmp files that hold disk space for good; a status.json cut
    in half must not stop the restart with a JSONDecodeError."""
    (tmp / "checkpoints").mkdir()
    leftovers = [tmp / "checkpoints" / "ckpt_step00000040.pt.tmp", tmp / "checkpoints" / "best.pt.tmp",
                 tmp / "status.json.4242.tmp", tmp / "metrics.jsonl.tmp"]
    for f in leftovers:
        f.write_bytes(b"partial")
    (tmp / "status.json").write_text('{"state": "runn')
    (tmp / "checkpoints" / "keep.pt").write_bytes(b"x")
    common.prepare_run_dir(tmp, no_resume=False)
    assert not any(f.exists() for f in leftovers) and (tmp / "checkpoints" / "keep.pt").exists()


def test_truncate_metrics_survives_a_half_written_last_line(tmp):
    """A kill in the middle of append_metrics leaves half a JSON line: the restart used to crash."""
    for s in range(1, 6):
        common.append_metrics(tmp, {"step": s, "loss": 1.0 / s})
    with open(tmp / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    common.truncate_metrics(tmp, 5)
    assert [r["step"] for r in metrics(tmp)] == [1, 2, 3, 4, 5]
    assert not list(tmp.glob("*.tmp"))


def test_an_invalid_config_value_is_a_user_error(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    for bad in ({"precision": {"value": "fp8"}}, {"batch_size": {"value": 0}}, {"batch_size": {"nov": 3}}):
        (tmp / "optimal_config.json").write_text(json.dumps({"trainers": {"gru": bad}}))
        with pytest.raises(UserError, match="is invalid"):  # the last: a KeyError traceback before
            common.resolve_settings(train_gru.parser, [], lambda m: None)


def test_quick_runs_take_the_quick_column_of_the_config(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    cfg = {"trainers": {"gru": {"batch_size": {"value": 8, "quick_value": 16, "reason": "t"}}}}
    (tmp / "optimal_config.json").write_text(json.dumps(cfg))
    assert common.resolve_settings(train_gru.parser, [], lambda m: None)[0].batch_size == 8
    assert common.resolve_settings(train_gru.parser, ["--quick"], lambda m: None)[0].batch_size == 16


def test_typed_flags_are_found_by_public_argparse_and_aliases_map_to_their_dest():
    argv = ["--batch_size", "4", "--gradient_accumulation_steps=2", "--mixed_precision", "--seed", "1337",
            "--quick"]
    assert common.explicit_flags(train_gru.parser, argv) == {"batch_size", "grad_accum", "precision", "seed",
                                                             "quick"}
    assert common.explicit_flags(train_gru.parser, []) == set()
    # the reader is a copy: the trainer's own parser keeps its defaults
    assert train_gru.parser.parse_args([]).batch_size == "auto"


def test_a_flag_typed_at_its_default_value_still_beats_the_config(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    cfg = {"trainers": {"gru": {"batch_size": {"value": 6, "reason": "t"}, "seed": {"value": 5, "reason": "t"},
                                "workers": {"value": 2, "reason": "no flag: set as is"}}}}
    (tmp / "optimal_config.json").write_text(json.dumps(cfg))
    args, src = common.resolve_settings(train_gru.parser, ["--batch-size", "auto", "--seed=1337"], lambda m: None)
    assert (args.batch_size, src["batch_size"]) == ("auto", "flag")
    assert (args.seed, src["seed"]) == (1337, "flag")
    assert (args.workers, src["workers"]) == (2, "optimal_config.json")


def test_invalid_config_values_keep_the_type_and_choice_messages(tmp, monkeypatch):
    monkeypatch.chdir(tmp)
    for bad, detail in (({"precision": {"value": "fp8"}}, "(not one of auto, fp32, bf16, fp16)"),
                        ({"batch_size": {"value": 0}}, "(must be a positive integer, got 0)"),
                        ({"seed": {"value": "x"}}, "(must be an integer, 0 or more, got 'x')")):
        (tmp / "optimal_config.json").write_text(json.dumps({"trainers": {"gru": bad}}))
        with pytest.raises(UserError) as e:
            common.resolve_settings(train_gru.parser, [], lambda m: None)
        key = next(iter(bad))
        assert str(e.value) == (f"--config optimal_config.json: gru.{key} = {bad[key]['value']!r} is invalid "
                                f"{detail}; regenerate it with `python memory_optimizer.py config`")


def test_oom_in_the_first_forward_with_an_enabled_grad_scaler_retries_cleanly():
    """Before any scaler.scale() the scaler has no scale tensor and nothing to forget."""
    calls = []

    def oom_first(model, mb):
        calls.append(len(mb["x"]))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return loss_fn(model, mb)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    common.train_step(model, opt, scaler, ragged_batch(), oom_first, 12, clip=1.0, device=DEV, amp_dtype=None,
                      log=lambda m: None)
    assert calls[:2] == [12, 6] and scaler.get_scale() == 1024.0


PRIVATE = re.compile(r"\._actions\b|\._option_string_actions\b|\._defaults\b|_per_optimizer_states|"
                     r"\b_refresh_per_optimizer_state\b|\btorch(\.\w+)*\._[a-zA-Z]\w*|\bscaler\._[a-zA-Z]\w*")


def test_no_private_argparse_or_torch_attribute_is_used():
    files = sorted(REPO.glob("*.py")) + sorted(REPO.glob("tests/*.py"))
    hits = [f"{f.name}:{i}: {line.strip()}" for f in files if f.name != "test_common.py"
            for i, line in enumerate(f.read_text().splitlines(), 1) if PRIVATE.search(line)]
    assert not hits, "\n".join(hits)


def test_a_full_disk_during_a_save_is_one_error_line_and_keeps_the_earlier_checkpoints(tmp, monkeypatch):
    """ENOSPC in the middle of torch.save (which reports it as a RuntimeError from the OSError):
    a UserError saying how much space is needed, the partial file deleted, earlier files intact."""
    import errno
    import io
    common.save_checkpoint(tmp, 10, {"step": 10, "w": torch.zeros(1000)}, keep=3)

    class Full(io.FileIO):
        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common, "open", lambda p, mode: Full(p, mode), raising=False)
    with pytest.raises(UserError, match=r"the disk is full: ckpt_step00000020.pt needs about 4 MB in .* MB free\); "
                                        "free some space and re-run the same command"):
        common.save_checkpoint(tmp, 20, {"step": 20, "w": torch.zeros(1_000_000)}, keep=3)
    monkeypatch.undo()
    names = sorted(f.name for f in (tmp / "checkpoints").iterdir())
    assert names == ["ckpt_step00000010.pt", "ckpt_step00000010.pt.sha256"]  # no .tmp left holding the space
    assert common.load_checkpoint(tmp / "checkpoints" / "ckpt_step00000010.pt")["step"] == 10
    # through a trainer: status.json says failed, with the reason, and the exit is one error: line
    status = {"started": 0.0}
    with pytest.raises(UserError):
        with common.recording_failures(tmp, status):
            raise UserError("--out x: the disk is full: ...")
    assert json.loads((tmp / "status.json").read_text())["state"] == "failed"
    assert json.loads((tmp / "status.json").read_text())["error"] == "--out x: the disk is full: ..."


def test_a_kill_while_best_pt_is_written_leaves_no_step_checkpoint_so_the_replay_rewrites_it(tmp, monkeypatch):
    """best.pt is written before the step checkpoint that made it: killed in between, the run
    resumes from the checkpoint before and replays the step, so best.pt is never left stale (it
    was: a kill during the copy kept the old best.pt for good)."""
    common.save_checkpoint(tmp, 1, {"step": 1}, keep=3, best=True)

    def killed(*a):
        raise SystemExit("kill -9")  # where the process would die
    monkeypatch.setattr(common.shutil, "copyfile", killed)
    with pytest.raises(SystemExit):
        common.save_checkpoint(tmp, 2, {"step": 2}, keep=3, best=True)
    monkeypatch.undo()
    assert not (tmp / "checkpoints" / "ckpt_step00000002.pt").exists()
    state, _ = common.find_checkpoint(tmp, argparse.Namespace(resume=None, no_resume=False, trainer="gru"))
    assert state["step"] == 1  # the resume replays step 2 ...
    common.prepare_run_dir(tmp, no_resume=False)  # (which removes the kill's .tmp files)
    common.save_checkpoint(tmp, 2, {"step": 2}, keep=3, best=True)  # ... and writes both again
    assert common.load_checkpoint(tmp / "checkpoints" / "best.pt")["step"] == 2
    assert not list((tmp / "checkpoints").glob("*.tmp"))


def test_a_low_disk_is_warned_about_before_it_fills(tmp, monkeypatch):
    common.save_checkpoint(tmp, 1, {"w": torch.zeros(10_000)}, keep=3)
    size = (tmp / "checkpoints" / "ckpt_step00000001.pt").stat().st_size
    logs = []
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: argparse.Namespace(free=2 * size))
    common.save_checkpoint(tmp, 2, {"w": torch.zeros(10_000)}, keep=3, log=logs.append)
    assert len(logs) == 1 and "MB free in" in logs[0] and "lower --keep" in logs[0]
    monkeypatch.setattr(common.shutil, "disk_usage", lambda p: argparse.Namespace(free=100 * size))
    common.save_checkpoint(tmp, 3, {"w": torch.zeros(10_000)}, keep=3, log=logs.append)
    assert len(logs) == 1


def test_another_trainers_checkpoint_or_run_folder_is_one_error_line(tmp):
    common.save_checkpoint(tmp / "lm", 5, {"step": 5, "args": {"trainer": "lm"}}, keep=3)
    (tmp / "lm" / "status.json").write_text(json.dumps({"trainer": "lm", "state": "done"}))
    ckpt = tmp / "lm" / "checkpoints" / "ckpt_step00000005.pt"
    gru = argparse.Namespace(resume=None, no_resume=False, out=str(tmp / "lm"), trainer="gru", seed=0,
                             device="cpu", precision="fp32")
    with pytest.raises(UserError, match=r"--out .*lm: made by train_lm.py, not train_gru.py; pick a train_gru.py run"):
        common.open_run(gru, {})
    with pytest.raises(UserError, match=r"--resume .*ckpt_step00000005.pt: made by train_lm.py, not train_gru.py"):
        common.find_checkpoint(tmp / "new", argparse.Namespace(resume=str(ckpt), no_resume=False, trainer="gru"))
    with pytest.raises(UserError, match=r"--suggest .*made by train_lm.py"):
        common.load_run_model(tmp / "lm", "--suggest", "gru", "step")
    with pytest.raises(UserError, match=r"^--resume .*ckpt_step00000005.pt: made by train_lm.py"):
        common.load_run_model(tmp / "new", "--suggest", "gru", "step", resume=str(ckpt))
    # the LM and SFT share a model: each reads the other's runs
    assert common.load_run_model(tmp / "lm", "--init-from", "sft", "step")[0]["step"] == 5
    ckpt.write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"none of its 1 checkpoint file\(s\) is loadable"):
        common.load_run_model(tmp / "lm", "--init-from", "sft", "step")


def test_a_checkpoints_folder_that_cannot_be_written_is_found_before_training(tmp, monkeypatch):
    (tmp / "r" / "checkpoints").mkdir(parents=True)
    real = common.tempfile.TemporaryFile

    def read_only(dir=None):
        if Path(dir).name == "checkpoints":
            raise PermissionError(13, "Permission denied")
        return real(dir=dir)
    monkeypatch.setattr(common.tempfile, "TemporaryFile", read_only)
    with pytest.raises(UserError, match=r"cannot write in .*checkpoints \(Permission denied\); make it writable"):
        common.check_out_writable(tmp / "r")
    monkeypatch.undo()
    (tmp / "f").mkdir()
    (tmp / "f" / "checkpoints").write_text("not a folder")
    with pytest.raises(UserError, match=r"checkpoints is not a folder"):
        common.check_out_writable(tmp / "f")


def test_validation_oom_halves_the_evaluation_batch_until_it_fits():
    seen, logs = [], []

    def evaluate(bs):
        seen.append(bs)
        if bs > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return sum(range(20)) / 20  # a sum over items: the same at any batch size
    assert common.evaluate_halving(evaluate, 32, DEV, logs.append) == (9.5, 4)
    assert seen == [32, 16, 8, 4] and logs[-1] == "out of memory in evaluation: its batch halved to 4; evaluating again"

    def broken(bs):
        raise ValueError("not memory")
    with pytest.raises(ValueError):
        common.evaluate_halving(broken, 32, DEV)


@pytest.mark.parametrize("bf16_ms,want", [(10, "bf16"), (25, "fp32")])
def test_auto_precision_on_cpu_is_measured_on_the_models_own_step(monkeypatch, bf16_ms, want):
    """bf16 only where the CPU has bf16 units and the timed step is clearly faster; the timed
    steps leave the model's buffers (BatchNorm statistics) and the RNG as they were."""
    import time
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.named_buffers()}

    def step(dt):
        model(torch.randn(8, 4) + 5).sum().backward()  # moves the running mean
        time.sleep((bf16_ms if dt is torch.bfloat16 else 20) / 1e3)
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: True)
    args = argparse.Namespace(precision="fp32", quick=False)
    torch.manual_seed(0)
    dtype, why = common.measure_precision(args, {"precision": "auto"}, DEV, model, step, margin=1.15)
    assert args.precision == want and dtype == (torch.bfloat16 if want == "bf16" else None)
    assert re.search(r"this model's step 2\d\.\d ms in fp32, \d+\.\d ms in bf16", why)
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())
    drawn = torch.randn(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.randn(3))  # the RNG did not move
    # typed precisions, resumes and CPUs without bf16 units measure nothing
    calls = []
    assert common.measure_precision(argparse.Namespace(precision="fp32"), {"precision": "flag"}, DEV, model,
                                    calls.append) == (None, None)
    assert common.measure_precision(argparse.Namespace(precision="fp32"), {"precision": "auto"}, DEV, model,
                                    calls.append, resumed="bf16")[0] is torch.bfloat16
    assert common.measure_precision(argparse.Namespace(precision="fp32", quick=True), {"precision": "auto"}, DEV,
                                    model, calls.append)[0] is None
    # a trainer copied without precision_probe.py stays in fp32 on a bf16 CPU, and says why
    monkeypatch.setitem(sys.modules, "precision_probe", None)  # import fails with ModuleNotFoundError
    assert common.measure_precision(argparse.Namespace(precision="fp32", quick=False), {"precision": "auto"}, DEV,
                                    model, calls.append) == (None, "CPU: fp32 (precision_probe.py, which times "
                                                                   "bf16 here, is not beside the trainer)")
    monkeypatch.setattr(common, "cpu_has_bf16", lambda: False)
    assert common.measure_precision(argparse.Namespace(precision="fp32", quick=False), {"precision": "auto"}, DEV,
                                    model, calls.append)[0] is None
    assert calls == []


def test_a_checkpoint_that_is_no_dict_is_refused_centrally(tmp):
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    with pytest.raises(UserError, match=r"--resume .*tensor.pt is not a train_asr.py checkpoint \(it holds a Tensor\)"):
        common.find_checkpoint(tmp, argparse.Namespace(resume=str(tmp / "tensor.pt"), no_resume=False, trainer="asr"))
    common.save_checkpoint(tmp, 1, {"step": 1}, keep=3)
    torch.save([1, 2], tmp / "checkpoints" / "ckpt_step00000002.pt")
    logs = []
    state, _ = common.find_checkpoint(tmp, argparse.Namespace(resume=None, no_resume=False, trainer="asr"), logs.append)
    assert state == {"step": 1} and "holds a list, not a checkpoint" in logs[0]


def test_ctrl_c_at_once_is_one_line_exit_130(capsys):
    """A second Ctrl-C (install_stop_handlers raises KeyboardInterrupt), or one before the handlers are
    installed, stops at once: one line that says how to resume, exit 130, no traceback (a new user's review)."""
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err == "stopped at once by Ctrl-C (a training run resumes from its last checkpoint when re-run)\n"


def test_a_resumed_run_keeps_its_last_evaluation_in_status_json(tmp, monkeypatch):
    """A new user's review: status.json lost `metric` on resume until the next evaluation (`status` showed
    "-" for hundreds of steps). A resumed run starts with the last one; --no-resume starts without."""
    monkeypatch.setattr(common, "install_stop_handlers", lambda: {"stop": None})  # pytest keeps its own
    args, out = argparse.Namespace(no_resume=False, identity="x"), tmp / "r"
    _, status, _ = common.start_run(out, args, "gru", "val_ppl")
    common.update_status(out, status, state="stopped", step=300, metric=7.4)
    common.start_run(out, args, "gru", "val_ppl")
    st = json.loads((out / "status.json").read_text())
    assert st["state"] == "starting" and st["metric"] == 7.4 and "step" not in st
    args.no_resume = True
    common.start_run(out, args, "gru", "val_ppl")
    assert "metric" not in json.loads((out / "status.json").read_text())
