"""train_lm.py: the real script in subprocesses on CPU, plus the eigenstate scan checked in-process."""
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import conftest
from conftest import REPO, assert_plan_near_peak, call, metrics, read_json, run, tree_digest

import train_lm

# a small model that steps in ~20 ms: for the tests that need many runs, not learning
# fp32 typed: an untyped precision is timed on the CPU (common.measure_precision), and two runs a
# test compares must not differ by what a busy machine made of that timing
TINY = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--grad-accum", "2", "--eval-tokens", "512", "--precision", "fp32"]


def deterministic(recs):
    """metrics.jsonl without the timing fields (ms/step, tokens/s, MFU, memory differ run to run)."""
    keep = ("step", "loss", "lr", "val_loss", "val_bpb")
    return [{k: r[k] for k in keep if k in r} for r in recs]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The README's quick run, cut to 120 steps (the full --quick, 300 steps, reaches 2.71 bits/byte)."""
    d = tmp_path_factory.mktemp("quick")
    p = run("train_lm.py", "--quick", "--max-steps", "120", "--eval-every", "60", "--log-every", "20",
            "--measure-peak", "--out", "runs/q", cwd=d, check=0)
    return d, d / "runs" / "q", p


def test_quick_run_learns_and_writes_the_run_folder(quick_run):
    d, out, p = quick_run
    s = read_json(out / "summary.json")
    # the bar: 8 bits/byte knows nothing; 120 steps on this corpus measured 3.32
    assert s["metric"] == "val_bpb" and s["value"] < 3.6, s
    assert_plan_near_peak(s)
    for key in ("tokens_per_s", "mfu", "params", "peak_mem_mb", "wall_s", "steps", "global_batch"):
        assert key in s
    assert s["steps"] == 120 and s["arch"] == "gpt" and s["seq_len"] == 64 and s["global_batch"] == 32
    assert s["effective_batch"] == read_json(out / "args.json")["chosen"]["effective_batch"] == 32
    assert "built-in corpus: Python's documentation topics" in p.stdout
    assert (d / "data" / "pydoc" / "meta.json").exists()
    # presets are printed with their parameter counts
    assert "preset small_32k eigen  8 layers, d 1024, 128 eigenstates" in p.stdout
    recs = metrics(out)
    logs = [r for r in recs if "loss" in r]
    assert all(k in logs[0] for k in ("ms_per_step", "tokens_per_s", "mfu", "peak_mem_mb", "lr"))
    assert logs[-1]["loss"] < 0.85 * logs[0]["loss"]  # measured 2.63 vs 3.28 at step 20
    assert [r["step"] for r in recs if "val_bpb" in r] == [60, 120]
    assert read_json(out / "status.json")["state"] == "finished"
    assert "MFU against measured" in p.stdout and (out / "peak_flops.json").exists()
    a = read_json(out / "args.json")["settings"]
    assert a["seq_len"] == {"value": 64, "source": "preset"} and a["lr"]["source"] == "preset"


def test_each_log_interval_writes_one_line_to_train_log(quick_run):
    """common.log_step's line every --log-every steps, in train.log as on the console, MFU at its end."""
    _, out, p = quick_run
    lines = [l for l in (out / "train.log").read_text().splitlines() if re.search(r"step .* \| loss .* ms/step", l)]
    assert [int(re.search(r"step +(\d+)/120", l).group(1)) for l in lines] == list(range(20, 121, 20)), lines
    assert all(re.search(r"\| [\d,]+ tokens/s \| RAM \d+ MB \| MFU [\d.]+%$", l) for l in lines), lines
    assert lines[0].split(" ", 2)[2] in p.stdout  # the console shows the same line (train.log adds the time)


def test_sample_from_a_run_folder(quick_run):
    d, out, _ = quick_run
    p = run("train_lm.py", "sample", "--out", out, "--prompt", "The with statement", "--max-new-tokens", "80",
            cwd=d, check=0)
    assert "best.pt" in p.stdout and p.stdout.count("The with statement") == 2
    text = p.stdout.split("prompt 'The with statement'\n", 1)[1]
    assert len(text) >= 80 and sum(c.isalpha() or c.isspace() for c in text) > 0.6 * len(text)
    p = run("train_lm.py", "sample", "--out", "nowhere", cwd=d, check=2)
    assert p.stderr.startswith("error: --out nowhere: no checkpoint there")


# -- the learning-rate schedule -------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_schedule_choices_follow_their_formula(tmp, schedule):
    """cosine (the default): warmup --warmup-steps (at most a tenth of the run), cosine to lr/10 at
    the last step, beta2 0.99. onecycle: warmup a tenth of the run, cosine to zero. The lr logged at
    step s is the one step s + 1 trains with; both are read back from metrics.jsonl."""
    flags = ["--schedule", schedule] if schedule == "onecycle" else []
    p = run("train_lm.py", *TINY, "--max-steps", "40", "--warmup-steps", "2", "--log-every", "1", "--lr", "1e-3",
            *flags, "--out", "s", cwd=tmp, check=0)
    lrs = {r["step"]: r["lr"] for r in metrics(tmp / "s") if "lr" in r}
    warmup, floor = (2, 0.1) if schedule == "cosine" else (4, 0.0)
    for s_, lr in lrs.items():
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, (s_ - warmup) / (40 - warmup))))
        assert lr == pytest.approx(1e-3 * min((s_ + 1) / warmup, floor + (1 - floor) * decay), abs=1e-12), s_
    assert lrs[40] == pytest.approx(1e-3 * floor, abs=1e-12) and max(lrs.values()) == pytest.approx(1e-3, rel=1e-3)
    assert f"AdamW betas (0.9, 0.99), weight decay 0.1; --schedule {schedule}: lr 0.001, warmup {warmup} steps" \
        in p.stdout
    settings = read_json(tmp / "s" / "args.json")["settings"]
    assert settings["schedule"]["value"] == schedule and settings["beta2"]["value"] == 0.99


@pytest.mark.parametrize("arch,L,d,T,K", [("gpt", 1, 16, 8, 4), ("gpt", 3, 48, 32, 4), ("eigen", 2, 32, 16, 8)])
def test_param_count_equals_the_built_model(arch, L, d, T, K):
    cfg = dict(arch=arch, vocab_size=train_lm.VOCAB, n_layer=L, n_head=4, d_model=d, seq_len=T, num_eigenstates=K,
               chunk_size=4)
    assert train_lm.param_count(cfg) == sum(p.numel() for p in train_lm.LM(cfg).parameters())


def test_adamw_is_fused_on_cpu_where_torch_has_the_kernel():
    """make_optimizer (train_lm.py and train_sft.py) uses the fused AdamW kernel on a CPU from
    torch 2.4: the optimizer step 3.6 -> 1.0 ms at bench_lm.py's shape A (docs/lm.md)."""
    import argparse
    model = train_lm.LM(dict(arch="gpt", vocab_size=train_lm.VOCAB, n_layer=1, n_head=2, d_model=16, seq_len=8,
                             num_eigenstates=4, chunk_size=4))
    args = argparse.Namespace(weight_decay=0.1, lr=1e-3, beta2=0.99, schedule="cosine", warmup_steps=2, optim="adamw")
    opt, _, _ = train_lm.make_optimizer(model, args, 10, torch.device("cpu"))
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert opt.defaults["fused"] is ((major, minor) >= (2, 4))


# -- the eigenstate scan -------------------------------------------------------------------------

@pytest.mark.parametrize("T,chunk", [(50, 1), (50, 7), (50, 16), (50, 50), (50, 64), (64, 16), (64, 64)])
def test_chunked_eigen_scan_equals_the_sequential_scan(T, chunk):
    """Output and gradients (inputs, |lambda|, omega) of the chunk-parallel form equal the plain
    recurrence, for chunks that divide T, do not divide it, and exceed it."""
    g = torch.Generator().manual_seed(T * 100 + chunk)
    K = 6
    beta = torch.randn(2, T, K, dtype=torch.float64, generator=g).requires_grad_()
    mag = (0.1 + 0.89 * torch.rand(K, dtype=torch.float64, generator=g)).requires_grad_()
    omega = (2 * torch.pi * torch.rand(K, dtype=torch.float64, generator=g)).requires_grad_()
    w = torch.randn(2, T, K, dtype=torch.float64, generator=g)  # a loss that weighs every output
    ref = train_lm.eigen_scan_reference(beta, mag, omega)
    got = train_lm.eigen_scan_chunked(beta, mag, omega, chunk)
    assert (ref - got).abs().max() <= 1e-5
    g_ref = torch.autograd.grad((ref * w).sum(), [beta, mag, omega])
    g_got = torch.autograd.grad((got * w).sum(), [beta, mag, omega])
    for a, b in zip(g_ref, g_got):
        assert (a - b).abs().max() <= 1e-5


def tiny_eigen(T, chunk=16):
    return dict(arch="eigen", vocab_size=train_lm.VOCAB, n_layer=2, n_head=1, d_model=16, seq_len=T,
                num_eigenstates=4, chunk_size=chunk)


def test_eigen_model_is_causal_and_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = train_lm.LM(tiny_eigen(40, chunk=16)).double()
    x = torch.randint(0, 256, (2, 40))
    y = x.clone()
    y[:, 30] = (y[:, 30] + 1) % 256
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :30], b[:, :30]) and not torch.allclose(a[:, 30:], b[:, 30:])
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(g1, g2, atol=1e-10) for g1, g2 in zip(*grads))


def saved_bytes(model, T):
    """Bytes autograd keeps for backward in one forward at context T (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    x = torch.randint(0, 256, (1, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def test_eigen_activation_memory_grows_linearly_with_context():
    torch.manual_seed(0)
    small, big = saved_bytes(train_lm.LM(tiny_eigen(4096)), 1024), saved_bytes(train_lm.LM(tiny_eigen(4096)), 4096)
    # 4x the context: 4x the memory (attention-like growth would be 16x)
    assert 3.5 <= big / small <= 4.2, (small, big)


# -- data: prepare, memmaps, RAM -----------------------------------------------------------------

def test_prepare_round_trip(tmp):
    src = tmp / "texts"
    (src / "sub").mkdir(parents=True)
    docs = {"a.txt": "Hello, world.\n" * 50, "sub/b.md": "Ünïcödé — ok ✓\n" * 40, "c.txt": "last one " * 30}
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    (src / "blob.bin").write_bytes(b"\0\1\2" * 100)  # a binary: skipped
    p = run("train_lm.py", "prepare", "--input", src, "--out-data", "packed", "--val-frac", "0.2", cwd=tmp, check=0)
    assert "packed 3 documents (1 binary files skipped)" in p.stdout
    meta = read_json(tmp / "packed" / "meta.json")
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257 and meta["dtype"] == "uint16"
    train = np.memmap(tmp / "packed" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tmp / "packed" / "val.bin", dtype=np.uint16, mode="r")
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert abs(meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) - 0.2) < 0.01
    ordered = [docs[k] for k in sorted(docs, key=lambda k: str(src / k))]  # files in path order
    stream = np.concatenate([train, val]).tolist()
    expect = []
    for i, text in enumerate(ordered):
        expect += list(text.encode("utf-8")) + ([train_lm.EOT] if i < len(ordered) - 1 else [])
    assert stream == expect
    assert train_lm.decode(stream) == "\n\n".join(ordered)
    # and it trains from the prepared folder
    run("train_lm.py", "--data", "packed", *TINY, "--max-steps", "2", "--out", "r", cwd=tmp, check=0)
    # a second prepare into the same folder is refused, nothing overwritten
    p = run("train_lm.py", "prepare", "--input", src, "--out-data", "packed", cwd=tmp, check=2)
    assert "already exists" in p.stderr


def test_nanogpt_benchmark_splits_hold_out_each_tenth_once(tmp):
    """bench_lm_nanogpt.py --splits: split r trains on all but the r-th tenth of the stream and scores on it;
    the ten held-out tenths cover the stream once, and split 9 holds out what the default split does."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_lm_nanogpt as bench
    data = tmp / "data"
    stream = np.arange(1, 1001, dtype=train_lm.DTYPE) % 250
    meta = train_lm.write_corpus(data, [lambda: bytes(stream.astype(np.uint8))], 0.1, ["test"])
    seen = []
    for r in range(10):
        d, n_val = bench.split_data(data, meta, r, tmp)
        train = np.fromfile(d / "train.bin", dtype=train_lm.DTYPE)
        val = np.fromfile(d / "val.bin", dtype=train_lm.DTYPE)
        assert train_lm.load_meta(d, 8)["val_tokens"] == n_val == len(val) == 100
        seam = [train_lm.EOT] if 0 < r < 9 else []
        assert train.tolist() == stream[:100 * r].tolist() + seam + stream[100 * (r + 1):].tolist()
        seen += val.tolist()
    assert seen == stream.tolist()
    assert val.tolist() == np.fromfile(data / "val.bin", dtype=train_lm.DTYPE).tolist()


RSS_PROBE = r"""
import sys, psutil, numpy as np
sys.path.insert(0, sys.argv[1])
import train_lm
path, n = sys.argv[2], int(sys.argv[3])
train_lm.get_batch(path, n, 1024, 0, 0, 8, 0, 8)
before = psutil.Process().memory_info().rss
for step in range(400):  # 400 x 8 x 1 KB windows: touches ~3 MB of the corpus, wherever it lies
    train_lm.get_batch(path, n, 1024, 0, step, 8, 0, 8)
print(psutil.Process().memory_info().rss - before)
"""


def test_ram_stays_flat_with_corpus_size(tmp):
    """Sampling windows from a 10x bigger corpus does not raise the process's RSS: windows are
    read through a short-lived memmap, never the whole file."""
    grew = {}
    for name, mb in (("small", 4), ("big", 40)):
        rng = np.random.default_rng(0)
        docs = [lambda: rng.integers(32, 127, size=1 << 20, dtype=np.uint8).tobytes()] * mb
        meta = train_lm.write_corpus(tmp / name, docs, 0.05, ["random"])
        p = subprocess.run([sys.executable, "-c", RSS_PROBE, str(REPO), str(tmp / name / "train.bin"),
                            str(meta["train_tokens"])], capture_output=True, text=True, check=True)
        grew[name] = int(p.stdout.strip())
    # the big corpus is 76 MB on disk: loading it would add that much
    assert grew["big"] < 8 * 2**20 and grew["big"] < grew["small"] + 4 * 2**20, grew


# -- DDP (kill -9 and resume: tests/test_first_run.py) -------------------------------------------


def test_two_process_ddp_gives_the_same_losses_as_one_process(tmp):
    """Global batch 16 either way: 1 process x 8 x 2 accumulation, or 2 gloo ranks x 4 x 2 (no_sync on
    the first micro-batch). Each rank reads its slice of the same windows, so losses match."""
    common = [*TINY[:8], "--grad-accum", "2", "--eval-tokens", "512", "--max-steps", "6", "--log-every", "2",
              "--eval-every", "3", "--device", "cpu", "--precision", "fp32"]
    run("train_lm.py", *common, "--batch-size", "8", "--out", "one", cwd=tmp, check=0)

    def torchrun(*flags):
        return conftest.torchrun("train_lm.py", *common, "--batch-size", "4", *flags, "--out", "two", cwd=tmp)
    torchrun()
    one, two = deterministic(metrics(tmp / "one")), deterministic(metrics(tmp / "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] and len(one) >= 5
    for a, b in zip(one, two):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
    s = read_json(tmp / "two" / "summary.json")
    assert s["world_size"] == 2 and s["global_batch"] == 16 and s["effective_batch"] == 8  # per rank
    assert read_json(tmp / "two" / "args.json")["chosen"]["micro_batch"] == 4
    # resuming with another number of processes is refused; with the same number it continues
    p = run("train_lm.py", *common, "--batch-size", "4", "--max-steps", "8", "--out", "two", cwd=tmp, check=2)
    assert "was trained on 2 process(es), this is 1" in p.stderr
    out = torchrun("--max-steps", "8")
    assert "resumed from" in out and "ckpt_step00000006.pt" in out
    assert read_json(tmp / "two" / "summary.json")["steps"] == 8


def test_resource_efficient_and_config_file(tmp):
    flags = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--eval-tokens", "512", "--max-steps", "2"]
    p = run("train_lm.py", *flags, "--resource-efficient", "--seq-len", "32", "--out", "re", cwd=tmp, check=0)
    assert "--resource-efficient changes:" in p.stdout and "gradient checkpointing" in p.stdout
    a = read_json(tmp / "re" / "args.json")
    s = a["settings"]
    assert s["grad_checkpointing"] == {"value": True, "source": "resource-efficient"}
    assert s["save_every"]["value"] == 50 and s["eval_every"]["value"] == 50
    assert a["chosen"]["effective_batch"] == 32 and a["chosen"]["micro_batch"] < 32
    # optimal_config.json: its seq_len (CPU 256, quick 64) applies unless typed
    run("memory_optimizer.py", "config", cwd=tmp, check=0)
    run("train_lm.py", *flags, "--quick", "--out", "c", cwd=tmp, check=0)
    assert read_json(tmp / "c" / "args.json")["settings"]["seq_len"] == {"value": 64, "source": "optimal_config.json"}


# -- --eval-only and --tensorboard ---------------------------------------------------------------

def test_eval_only_reproduces_the_final_validation_and_writes_nothing_else(tmp):
    """report() scores the model as the loop left it: the weights of the last step's checkpoint
    (ckpt_step00000006.pt: a run always saves at its last step), at the checkpoint's micro-batch.
    So --eval-only --resume that file gives summary.json's value and val_loss (both rounded as
    there: measured equal to the digit). Without --out it takes the newest train_lm.py run under
    runs/, without --resume its best.pt: the best of the evaluations at steps 3 and 6, best_value."""
    flags = [*TINY, "--max-steps", "6", "--eval-every", "3", "--log-every", "3"]
    run("train_lm.py", *flags, "--out", "runs/r", cwd=tmp, check=0)
    out = tmp / "runs" / "r"
    s, before = read_json(out / "summary.json"), tree_digest(out)
    p = run("train_lm.py", *flags, "--eval-only", "--out", "runs/r", "--resume",
            "runs/r/checkpoints/ckpt_step00000006.pt", cwd=tmp, check=0)
    e = read_json(out / "eval.json")
    assert e["metric"] == "val_bpb" and e["checkpoint"].endswith("ckpt_step00000006.pt") and e["step"] == 6, e
    assert e["value"] == s["value"] and abs(e["val_loss"] - s["val_loss"]) <= 1e-6, (e, s)
    assert f"eval: val {s['value']:.4f} bits/byte ({s['val_loss']:.4f} nats/token" in p.stdout
    # checkpoints, status.json, metrics.jsonl, train.log, summary.json: all as they were
    assert tree_digest(out, skip="eval.json") == before
    i = flags.index("--precision")
    untyped = flags[:i] + flags[i + 2:]  # eval-only then takes the checkpoint's precision
    run("train_lm.py", *untyped, "--eval-only", cwd=tmp, check=0)
    e = read_json(out / "eval.json")
    assert e["checkpoint"].endswith("best.pt") and e["value"] == s["best_value"] and e["precision"] == "fp32", e
    assert tree_digest(out, skip="eval.json") == before and not (tmp / "runs" / "r" / "tb").exists()
    # a typed precision wins over the checkpoint's, a typed auto too (it took bf16's here once)
    run("train_lm.py", *untyped, "--precision", "bf16", "--out", "runs/b", cwd=tmp, check=0)
    run("train_lm.py", *untyped, "--precision", "auto", "--eval-only", "--out", "runs/b", cwd=tmp, check=0)
    assert read_json(tmp / "runs" / "b" / "eval.json")["precision"] == "fp32"


def test_tensorboard_gets_the_log_lines_and_the_evaluations(tmp):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run("train_lm.py", *TINY, "--max-steps", "4", "--log-every", "2", "--eval-every", "2", "--tensorboard",
        "--out", "r", cwd=tmp, check=0)
    assert list((tmp / "r" / "tb").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tmp / "r" / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_bpb", "eval/val_loss"} <= tags, tags
    assert [e.step for e in ea.Scalars("train/loss")] == [e.step for e in ea.Scalars("eval/val_bpb")] == [2, 4]
    # the numbers metrics.jsonl has (TensorBoard keeps float32)
    recs = metrics(tmp / "r")
    assert [e.value for e in ea.Scalars("eval/val_bpb")] == pytest.approx([r["val_bpb"] for r in recs
                                                                           if "val_bpb" in r], abs=1e-5)
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([r["loss"] for r in recs if "loss" in r],
                                                                         abs=1e-5)


# -- user mistakes: one line on stderr, exit 2, nothing already saved is touched ----------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    run("train_lm.py", *TINY, "--max-steps", "2", "--out", "run", cwd=d, check=0)
    (d / "nometa").mkdir()
    (d / "badmeta").mkdir()
    (d / "badmeta" / "meta.json").write_text("{not json")
    (d / "short").mkdir()
    train_lm.write_corpus(d / "short" / "c", [lambda: b"tiny text " * 20], 0.1, ["x"])
    torch.save({"model": {}, "step": 3}, d / "foreign.pt")  # loadable, but not one of ours
    torch.save(torch.zeros(3), d / "tensor.pt")  # loadable, and not even a dict
    (d / "latin1meta").mkdir()
    (d / "latin1meta" / "meta.json").write_bytes('{"tokenizer": "bytes", "note": "café"}'.encode("latin-1"))
    # another trainer's run folder, and its checkpoints alone (no status.json to name the trainer)
    run("train_gru.py", "--quick", "--dataset-size", "300", "--batch-size", "8", "--max-steps", "1",
        "--out", "grurun", cwd=d, check=0)
    shutil.copytree(d / "grurun" / "checkpoints", d / "gruckpts" / "checkpoints")
    for name, change in (("wrongvocab", {"vocab_size": 100}), ("strcount", {"val_tokens": "150"})):
        shutil.copytree(d / "short" / "c", d / name)
        meta = json.loads((d / name / "meta.json").read_text())
        (d / name / "meta.json").write_text(json.dumps({**meta, **change}))
    return d


@pytest.mark.parametrize("flags,expect", [
    (["--data", "missing"], "--data missing: no such folder"),
    (["--data", "nometa"], "--data nometa: no readable meta.json"),
    (["--data", "badmeta"], "--data badmeta: no readable meta.json"),
    (["--data", "short/c"], "fewer than --seq-len 32 + 1"),
    (["--data", "short/c/meta.json"], "is a file; pass the folder"),
    (["--data", "wrongvocab"], "meta.json says vocab_size 100"),
    (["--data", "strcount"], "meta.json's val_tokens is '150', not a token count"),
    (["--arch", "rnn"], "--arch"),
    (["--n-head", "3"], "--d-model 32 is not divisible by --n-head 3"),
    (["--seq-len", "0"], "--seq-len"),
    (["--beta2", "1"], "--beta2 1.0: must be in (0, 1)"),
    (["--schedule", "linear"], "--schedule"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--arch", "eigen"], "was trained with arch gpt (now eigen)"),  # resuming run/ with another model
    (["--precision", "fp16"], "fp16 needs CUDA"),
    (["--out", "afile/run"], "--out afile/run"),
    (["--tensorboard"], "--tensorboard: the tensorboard package is not installed"),
    (["--eval-only", "--out", "run2"], "--out run2: no checkpoint there; train first"),
    (["--eval-only", "--d-model", "64"], "run/checkpoints/best.pt was trained with d_model 32 (now 64)"),
    (["--resume", "foreign.pt", "--out", "run2"], "foreign.pt is not a train_lm.py checkpoint"),
    (["--resume", "tensor.pt", "--out", "run2"], "tensor.pt is not a train_lm.py checkpoint"),
    (["--data", "latin1meta"], "--data latin1meta: no readable meta.json (UnicodeDecodeError)"),
    (["--out", "grurun"], "--out grurun: made by train_gru.py, not train_lm.py"),
    (["--out", "gruckpts"], "ckpt_step00000001.pt: made by train_gru.py, not train_lm.py"),
    (["--resume", "grurun/checkpoints/best.pt", "--out", "run2"],
     "--resume grurun/checkpoints/best.pt: made by train_gru.py, not train_lm.py"),
])
def test_bad_input_exits_2_with_one_line_and_keeps_saved_files(saved_run, flags, expect):
    d = saved_run
    if "--tensorboard" in flags and importlib.util.find_spec("tensorboard"):
        pytest.skip("tensorboard is installed here")
    (d / "afile").write_text("not a folder")
    before = {name: tree_digest(d / name) for name in ("run", "grurun", "gruckpts")}
    typed = {f for f in flags if f.startswith("--")}
    base = [a for i, a in enumerate(TINY) if a not in typed and TINY[i - 1] not in typed]  # flags win
    out = [] if "--out" in flags else ["--out", "run"]
    p = call("train_lm.py", *base, *flags, *out, cwd=d)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], p.stderr
    assert {name: tree_digest(d / name) for name in before} == before and not (d / "run2").exists()


@pytest.mark.parametrize("args,expect", [
    (["--out", "grurun"], "--out grurun: grurun/checkpoints/best.pt is not a train_lm.py checkpoint"),
    (["--out", "run", "--resume", "grurun/checkpoints/best.pt"],
     "--resume grurun/checkpoints/best.pt: made by train_gru.py, not train_lm.py"),
    (["--out", "run", "--resume", "tensor.pt"], "tensor.pt is not a train_lm.py checkpoint (it holds a Tensor)"),
])
def test_sample_from_another_trainers_checkpoint_exits_2(saved_run, args, expect):
    p = call("train_lm.py", "sample", *args, cwd=saved_run)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert p.stderr.startswith("error:") and expect in p.stderr and len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,expect", [
    (["--input", "nothing.txt", "--out-data", "x"], "--input nothing.txt: no such file or folder"),
    (["--input", "run/args.json", "--out-data", "x", "--val-frac", "0.7"], "--val-frac 0.7"),
    (["--out-data", "x"], "--input"),
    (["--input", "run/args.json", "--out-data", "run/args.json"], "--out-data run/args.json: is a file"),
    (["--input", "run/args.json", "--out-data", "afile/sub"],
     "--out-data afile/sub: afile is not a writable folder; pick another --out-data"),
])
def test_prepare_mistakes_exit_2(saved_run, args, expect):
    (saved_run / "afile").write_text("not a folder")
    p = call("train_lm.py", "prepare", *args, cwd=saved_run)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    assert p.stderr.startswith("error:") and expect in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_prepare_skips_empty_hidden_and_binary_files_and_names_them(tmp):
    (tmp / "t" / ".git").mkdir(parents=True)
    (tmp / "t" / "a.txt").write_text("plain words and more words. " * 60)
    (tmp / "t" / "empty.txt").write_text("")
    (tmp / "t" / ".git" / "config").write_text("[core] hidden " * 100)
    (tmp / "t" / "blob.bin").write_bytes(b"\0\1\2" * 500)
    p = run("train_lm.py", "prepare", "--input", "t", "--out-data", "d", cwd=tmp, check=0)
    assert "packed 1 documents (1 binary files skipped)" in p.stdout and "blob.bin" in p.stdout
    meta = read_json(tmp / "d" / "meta.json")
    assert meta["documents"] == 1 and meta["train_tokens"] + meta["val_tokens"] == 28 * 60
    assert "warning: validation holds only 168 tokens" in p.stdout
    assert not list(tmp.glob("d.tmp-*"))


# -- faults the machine causes, simulated in a wrapper script -----------------------------------

def patched(tmp, patch):
    """A script that runs train_lm.py after `patch` (Python source) replaced part of it."""
    path = tmp / "patched.py"
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport shutil, torch\nimport common, train_lm\n"
                    f"{patch}\ncommon.run_main(train_lm.main)\n")
    return path


# a validation batch above 2 windows "runs out of memory" (training's micro-batches of 4 do not)
OOM_IN_EVAL = """
def loss_fn(model, mb, device, real=train_lm.loss_fn):
    if not model.training and len(mb["x"]) > 2:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    return real(model, mb, device)
train_lm.loss_fn = loss_fn
"""


def test_out_of_memory_in_validation_halves_its_batch_and_changes_no_figure(tmp):
    flags = [*TINY, "--max-steps", "4", "--eval-every", "2"]
    run("train_lm.py", *flags, "--out", "ref", cwd=tmp, check=0)
    p = run(patched(tmp, OOM_IN_EVAL), *flags, "--out", "oom", cwd=tmp, check=0)
    # 4 -> 2 at the first evaluation; the later ones (step 4, the final report) start at 2
    assert p.stdout.count("out of memory in evaluation: its batch halved to 2; evaluating again") == 1, p.stdout
    assert "out of memory in evaluation" in (tmp / "oom" / "train.log").read_text()
    assert read_json(tmp / "oom" / "status.json")["state"] == "finished"
    ref, got = ([r["val_loss"] for r in metrics(tmp / name) if "val_loss" in r] for name in ("ref", "oom"))
    assert len(ref) == 2 and got == pytest.approx(ref, rel=1e-6)
    assert read_json(tmp / "oom" / "summary.json")["val_loss"] == pytest.approx(
        read_json(tmp / "ref" / "summary.json")["val_loss"], rel=1e-6)


def test_low_disk_warning_goes_to_the_run_log(tmp):
    low = "real = shutil.disk_usage\nshutil.disk_usage = lambda p: real(p)._replace(free=1)  # yet writes succeed"
    run(patched(tmp, low), *TINY, "--max-steps", "4", "--save-every", "2", "--out", "r", cwd=tmp, check=0)
    assert "warning: 0 MB free in" in (tmp / "r" / "train.log").read_text()


def test_mfu_peak_comes_from_the_config_and_mfu_never_reads_over_100_percent(tmp_path, monkeypatch):
    """The peak memory_optimizer.py config measured (on this machine, at this thread count) is
    the one every run uses; a peak read low is measured again, and never left under what the
    run just did."""
    import train_lm
    from memory_optimizer import cpu_model
    cpu = torch.device("cpu")
    cfg = tmp_path / "optimal_config.json"
    machine = {"cpu_model": cpu_model(), "gpu_name": None,
               "matmul_peak": {"device": "cpu", "threads": torch.get_num_threads(), "fp32_gflops": 123.0,
                               "bf16_gflops": 456.0}}
    cfg.write_text(json.dumps({"machine": machine}))
    assert train_lm.device_peak(cpu, None, cfg, tmp_path)[0] == 123e9
    flops, why = train_lm.device_peak(cpu, torch.bfloat16, cfg, tmp_path)
    assert flops == 456e9 and "bf16 matmul peak 456 GFLOP/s from" in why
    machine["matmul_peak"]["threads"] += 1  # measured at another thread count: measured here instead
    cfg.write_text(json.dumps({"machine": machine}))
    monkeypatch.setattr(train_lm, "matmul_peak", lambda device, dtype, seconds: 50e9)
    flops, why = train_lm.device_peak(cpu, None, cfg, tmp_path)
    assert flops == 50e9 and (tmp_path / "peak_flops.json").exists() and "memory_optimizer.py config" in why
    logs = []
    assert train_lm.checked_peak(100e9, 1e6, 5e4, 1, cpu, None, logs.append) == 100e9 and not logs  # MFU 50 %
    new = train_lm.checked_peak(10e9, 1e6, 5e4, 1, cpu, None, logs.append)  # MFU would be 500 %
    assert new == 50e9 and 1e6 * 5e4 / new <= 1 and "MFU would read 500 %" in logs[0]
    assert train_lm.checked_peak(10e9, 1e6, 8e4, 1, cpu, None, logs.append) == 80e9  # never under what was done
