"""train_sft.py: fine-tuning on request -> command pairs, the seed's modes, ask, and
continuous learning from the SQLite feedback store. The real script in subprocesses, on CPU."""
import functools
import http.server
import json
import re
import shutil
import sqlite3
import threading
import time

import pytest
import torch

from conftest import REPO, assert_plan_near_peak, call, metrics, popen, read_json, run, tree_digest

import train_sft

# a model that steps in a few ms: for runs that check plumbing, not learning (fp32: as test_lm's)
TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "160", "--precision", "fp32"]


def few_pairs(d):
    """Every 30th built-in pair (124, ~12 per split) in d/few.jsonl: for runs that check plumbing,
    where evaluating the full 370-pair test split would be most of the time."""
    (d / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))
    return ["--data", "few.jsonl"]


# the quick run on 8 of the 67 built-in templates, batch 8 for 400 steps: ~35 s on 2 cores (the
# full quick run, 600 steps of 32 pairs on all of them, takes ~3 min: README)
QUICK = ["--quick", "--data", "pairs.jsonl", "--batch-size", "8", "--grad-accum", "1",
         "--max-steps", "400", "--eval-every", "200"]
KEEP = ("kill ", "pip install ", "cd ", "git status", "ls -lS", "rm ", "docker pull ", "mkdir ")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    pairs = [p for p in train_sft.builtin_pairs() if "typo" not in p["output"]
             and train_sft.command_of(p["output"]).startswith(KEEP)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    p = run("train_sft.py", *QUICK, "--measure-peak", "--out", "runs/cmd", cwd=d, check=0, timeout=600)
    return d, d / "runs" / "cmd", p


def test_quick_sft_learns_commands(sft_run):
    d, out, p = sft_run
    s = read_json(out / "summary.json")
    assert_plan_near_peak(s)
    # measured: 14.6 % exact (7 of 48 test pairs), val loss 0.26; untrained: 0 % and ln(265) = 5.6
    assert s["task"] == "sft" and s["test_pairs"] == 48
    assert s["effective_batch"] == read_json(out / "args.json")["chosen"]["effective_batch"] == 8  # --quick's
    assert s["command_exact"] >= 0.08 and s["command_substring"] >= s["command_exact"], s
    vals = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < 0.5 and vals[0] < 1.5, vals  # nats per answer token
    assert "loss on the answer only" in p.stdout and "test command accuracy" in p.stdout
    # one plain line every --log-every (10) steps, in train.log as on the console (common.log_step)
    lines = [l for l in (out / "train.log").read_text().splitlines() if re.search(r"step .* \| loss .* ms/step", l)]
    assert [int(re.search(r"step +(\d+)/400", l).group(1)) for l in lines] == list(range(10, 401, 10)), lines
    assert all(re.search(r"\| [\d,]+ tokens/s \| RAM \d+ MB \| MFU [\d.]+%$", l) for l in lines), lines[:3]
    # ask: a command for a request, and a clear error for a run that is not fine-tuned
    a = run("train_sft.py", "ask", "--out", "runs/cmd", "list files by size", "show git status", cwd=d, check=0)
    lines = [l for l in a.stdout.splitlines() if l.startswith("$ ")]
    assert len(lines) == 2 and lines[0].startswith("$ ls"), a.stdout  # the second: whatever it learned


def test_ask_says_so_when_the_model_answers_no_command(monkeypatch, capsys):
    """A barely trained run may end its answer at once: `ask` printed a bare "$ " and nothing else."""
    monkeypatch.setattr(train_sft, "load_model", lambda args, task: (None, {"task": "sft", "step": 2}, "r/best.pt",
                                                                      torch.device("cpu")))
    monkeypatch.setattr(train_sft, "greedy_batch", lambda model, prompts, n, device: [[train_sft.EOT] for _ in prompts])
    assert train_sft.run_ask(["--out", "r", "list files"]) == 0
    out = capsys.readouterr().out
    assert "$ (no command: the model of step 2 answers nothing yet; train it longer" in out, out


def test_plain_defaults_learn_on_a_slice(tmp):
    """The plain run's settings (lr 4e-3, 16 x 2, onecycle over the run, context 256), only shorter:
    150 steps on the 20 built-in templates whose command has no slot (210 pairs, 19 test pairs:
    phrasings and prefixes the training split did not have). Measured, one thread, two runs: val loss
    0.82 and 0.93 nats per answer token, 4 of 19 substring (3 and 2 exact); untrained: ln(265) = 5.6
    and none. ~70 CPU s."""
    fixed = [line.split(" => ")[1] for line in re.sub(r"\n +", " ", train_sft.TEMPLATES).strip().split("\n")
             if "{" not in line]
    pairs = [p for p in train_sft.builtin_pairs() if "typo" not in p["output"]
             and train_sft.command_of(p["output"]) in fixed]
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run("train_sft.py", "--data", "pairs.jsonl", "--max-steps", "150", "--out", "r", cwd=tmp, check=0, timeout=900)
    s = read_json(tmp / "r" / "summary.json")
    assert len(fixed) == 20 and s["effective_batch"] == 32 and s["steps"] == 150 and s["test_pairs"] == 19, s
    assert s["value"] < 1.2 and s["command_substring"] >= 2 / 19 and s["command_substring"] >= s["command_exact"], s


def test_help_states_the_defaults_a_plain_run_takes(tmp, monkeypatch):
    """--help showed 100, 100, auto, 0.99 and "64 with --quick" where a plain run takes 500, 250, 16 x 2,
    0.95 and 256 (a new user's review): every default --help prints is the value the plain run resolves."""
    import common
    monkeypatch.chdir(tmp)  # no optimal_config.json here
    shown = vars(train_sft.parser.parse_args([]))  # what --help prints as each flag's default
    args, _ = common.resolve_settings(train_sft.parser, [], log=lambda _: None, modes=train_sft.apply_modes)
    for key in ("save_every", "eval_every", "batch_size", "grad_accum", "lr", "beta2", "schedule", "log_every"):
        assert shown[key] == vars(args)[key], key
    text = " ".join(train_sft.parser.format_help().split())
    assert f"context length in tokens (default: {args.seq_len})" in text and "(default: 0.95)" in text, text


def test_prompt_tokens_carry_no_loss():
    torch.manual_seed(0)
    pair = {"input": "list files by size", "output": "<command>ls -lS</command> largest first."}
    ids, n_prompt = train_sft.render(pair)
    assert ids[n_prompt] == train_sft.CMD_OPEN and ids[-1] == train_sft.EOT
    assert train_sft.decode_sft(ids[n_prompt:]) == pair["output"]
    other = train_sft.render({"input": "x", "output": "<command>pwd</command>"})
    batch = train_sft.collate([(ids, n_prompt), other], 200)
    model = train_sft.LM(dict(arch="gpt", vocab_size=train_sft.SFT_VOCAB, n_layer=1, n_head=2, d_model=32,
                             seq_len=200, num_eigenstates=4, chunk_size=8))
    logits = {}

    def keep(module, inputs, out):  # the logits, with their gradient kept
        out.retain_grad()
        logits["t"] = out
    model.head.register_forward_hook(keep)
    loss, n = train_sft.sft_loss_fn(model, batch, torch.device("cpu"))
    assert n == (len(ids) - n_prompt) + (len(other[0]) - other[1])  # answer tokens and <eot>, both rows
    loss.backward()
    g = logits["t"].grad.abs().sum(-1)  # (B, L): which positions the loss reads
    assert g[0, :n_prompt - 1].sum() == 0  # the prompt predicts nothing
    assert (g[0, n_prompt - 1:len(ids) - 1] > 0).all()  # every answer token does
    assert g[1, len(other[0]) - 1:].sum() == 0  # padding predicts nothing


def test_lengths_are_padded_to_a_multiple_of_32_and_the_padding_changes_no_number():
    """A new length every step grew the heap to GBs on real pairs (docs/sft.md): batches and the decoder's
    widths are padded to a multiple of 32, and the losses and the greedy answers stay those of each pair alone."""
    torch.manual_seed(0)
    model = train_sft.LM(dict(arch="gpt", vocab_size=train_sft.SFT_VOCAB, n_layer=1, n_head=2, d_model=32,
                              seq_len=200, num_eigenstates=4, chunk_size=8)).eval()
    pairs = [train_sft.render({"input": "show file " + "x" * i, "output": f"<command>cat f{i}</command>"})
             for i in (1, 9, 40)]
    batch = train_sft.collate(pairs, 200)
    assert batch["x"].shape[1] - 1 == 96  # the longest pair is 78 tokens: 77 inputs, padded to 96
    loss, n = train_sft.sft_loss_fn(model, batch, torch.device("cpu"))
    alone = sum(torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]]))[0, k - 1:], torch.tensor(ids[k:]),
                                                  reduction="sum") for ids, k in pairs)
    assert loss.item() == pytest.approx(alone.item(), rel=1e-5)
    prompts = [ids[:k] for ids, k in pairs]
    got = train_sft.greedy_batch(model, prompts, 12, torch.device("cpu"))
    for p, answer in zip(prompts, got):
        ids = list(p)
        with torch.no_grad():
            while len(ids) < len(p) + 12 and ids[-1:] != [train_sft.EOT]:
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert answer == ids[len(p):]


@pytest.mark.parametrize("flags, mode", [(["--resource-efficient"], "resource_efficient"),
                                         (["--cpu-only", "--resource-efficient"], "cpu_only"),
                                         (["--resource-efficient", "--cpu-only", "--mac"], "mac")])
def test_mode_values_reach_the_loop(tmp, flags, mode):
    p = run("train_sft.py", *flags, *TINY[:6], *few_pairs(tmp), "--max-steps", "1", "--out", "m",
            cwd=tmp, check=0)
    want = dict(train_sft.MODES[mode])
    if mode == "resource_efficient":  # it only lowers what the plain run chose; the micro-batch is halved
        plain = train_sft.SFT_DEFAULT
        want = {k: min(v, plain[k]) if k in plain and not isinstance(v, bool) else v for k, v in want.items()}
        want.update(batch_size=plain["batch_size"] // 2, grad_accum=plain["grad_accum"] * 2, lr=plain["lr"])
    loop = read_json(tmp / "m" / "args.json")["chosen"]["loop"]
    if want.get("precision") == "fp16":  # fp16 is for the GPU; this machine runs fp32
        want["precision"] = "fp32"
        assert "fp16 is for the GPU" in p.stdout
    for key, value in want.items():
        got = loop[{"batch_size": "micro_batch"}.get(key, key)]
        assert got == value, (key, got, value)
    # the before/after table is printed, and the plain run's settings are the "before"
    assert f"--{mode.replace('_', '-')}: the seed's settings" in p.stdout
    if mode == "resource_efficient":
        for row in (r"seq-len +256 -> 256 +kept: the mode only lowers", r"save-every +500 -> 200 ",
                    r"log-every +10 -> 10 +kept: the mode only lowers", r"swap-threshold +50.0 -> 30.0 ",
                    r"micro-batch +16 -> halved +grad-accum doubled"):
            assert re.search(row, p.stdout), row
    if len(flags) > 1:
        assert "the first wins" in p.stdout


def test_resource_efficient_never_raises_what_the_run_chose(tmp):
    """The issue: with --quick the mode raised the context 256 -> 1024, checkpointed 100 -> 200 and
    logged 10 -> 25, and set its own batch and lr. Now each length, cadence and threshold is the smaller
    of the two, the micro-batch halves with accumulation doubled (the same 32 pairs a step), the lr
    stays, and a typed value is kept."""
    few = few_pairs(tmp)
    p = run("train_sft.py", "--quick", "--resource-efficient", *TINY[:6], *few, "--plan", "--out", "q", cwd=tmp,
            check=0)
    for row in (r"seq-len +256 -> 256 ", r"save-every +100 -> 100 ", r"log-every +10 -> 10 ",
                r"eval-every +100 -> 50 ", r"workers +0 -> 0 ", r"grad-checkpointing +False -> True "):
        assert re.search(row, p.stdout), row
    assert "batch 8 x 4 accumulation = 32 pairs" in p.stdout and "halved by --resource-efficient" in p.stdout
    assert "lr 0.004," in p.stdout and "context 256" in p.stdout
    p = run("train_sft.py", "--resource-efficient", "--seq-len", "128", "--save-every", "300", *TINY[:6], *few,
            "--plan", "--out", "t", cwd=tmp, check=0)
    assert re.search(r"seq-len +128 -> 128 +kept: given as a flag", p.stdout)
    assert re.search(r"save-every +300 -> 300 +kept: given as a flag", p.stdout)
    assert "batch 8 x 4 accumulation = 32 pairs" in p.stdout and "context 128" in p.stdout


def test_plain_run_uses_the_measured_defaults_and_the_seed_column_stays_reachable(tmp):
    """The plain command's shape (docs/sft.md "defaults chosen by"): lr 4e-3, 16 pairs a step, 12 passes
    over the data but at least 1000 steps, context 256, the tiny preset, no loader workers; --epochs typed
    trains passes instead; the seed's standard column is the command line docs/sft.md prints."""
    few = few_pairs(tmp)
    p = run("train_sft.py", *few, "--plan", "--out", "p", cwd=tmp, check=0)
    assert "--preset tiny --arch gpt: 4 layers, d 128, 4 heads, context 256" in p.stdout
    assert "batch 16 x 2 accumulation = 32 pairs" in p.stdout and "precision" in p.stdout
    assert "lr 0.004, warmup 100 steps, cosine to 0 at step 1000" in p.stdout  # 12 passes of 99 pairs: 36 steps
    many = [dict(q, input=f"{q['input']} (copy {k})") for k in range(4) for q in train_sft.builtin_pairs()]
    (tmp / "many.jsonl").write_text("".join(json.dumps(q) + "\n" for q in many))
    n_train = sum(train_sft.split_of(q) >= 2 for q in many)
    p = run("train_sft.py", "--data", "many.jsonl", "--plan", "--out", "m", cwd=tmp, check=0)
    assert n_train // 32 * 12 > 1000 and f"cosine to 0 at step {n_train // 32 * 12}" in p.stdout, p.stdout
    assert f"; 12.0 passes over the {n_train:,} training pairs" in p.stdout
    p = run("train_sft.py", *few, "--epochs", "2", "--plan", "--out", "e", cwd=tmp, check=0)
    n_train = sum(train_sft.split_of(q) >= 2 for q in train_sft.builtin_pairs()[::30])
    assert f"cosine to 0 at step {2 * (n_train // 32)}" in p.stdout
    seed = ["--lr", "1e-4", "--batch-size", "16", "--grad-accum", "4", "--seq-len", "2048", "--epochs", "1",
            "--save-every", "500", "--eval-every", "100"]
    assert " ".join(seed) in (REPO / "docs" / "sft.md").read_text()
    p = run("train_sft.py", *seed, *TINY[:6], *few, "--plan", "--out", "s", cwd=tmp, check=0)
    assert "batch 16 x 4 accumulation = 64 pairs" in p.stdout and "lr 0.0001," in p.stdout
    assert "context 2048" in p.stdout


def test_flags_beat_the_mode_and_train_lm_names_the_new_command(tmp):
    p = run("train_sft.py", "--resource-efficient", "--lr", "1e-3", "--save-every", "300", *TINY[:6], *few_pairs(tmp),
            "--max-steps", "1", "--out", "m", cwd=tmp, check=0)
    loop = read_json(tmp / "m" / "args.json")["chosen"]["loop"]
    assert loop["lr"] == 1e-3 and loop["micro_batch"] == 8 and loop["save_every"] == 300
    assert re.search(r"save-every +300 -> 300 +kept: given as a flag", p.stdout)
    # the old spellings on train_lm.py: one line naming the new command, exit 2
    for bad in (["--mac"], ["--init-from", "m"], ["--continuous-learning"], ["--task", "sft", "--quick"],
                ["ask", "list files"], ["rate", "--list"]):
        p = call("train_lm.py", *bad, "--out", "x", cwd=tmp)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "moved to train_sft.py (train_lm.py pretrains only); run: python train_sft.py " in p.stderr
    assert "run: python train_sft.py --quick --out x" in call("train_lm.py", "--task", "sft", "--quick", "--out", "x",
                                                              cwd=tmp).stderr
    # --task lm is what train_lm.py does anyway: dropped, and the rest parses (here: a bad --max-steps)
    for task in (["--task", "lm"], ["--task=lm"]):
        p = call("train_lm.py", *task, "--max-steps", "abc", "--out", "x", cwd=tmp)
        assert p.returncode == 2 and "--max-steps: must be a positive integer, got 'abc'" in p.stderr, p.stderr
        assert "train_sft" not in p.stderr
    p = call("train_sft.py", "--continuous-learning", "--out", "x", cwd=tmp)
    assert p.returncode == 2 and "needs --feedback-db" in p.stderr
    assert not (tmp / "x").exists()


def test_sft_keeps_onecycle_and_beta2_095(tmp):
    """The sft thresholds were measured with the old schedule: the plain run's layer keeps it."""
    p = run("train_sft.py", *TINY, *few_pairs(tmp), "--max-steps", "1", "--out", "m", cwd=tmp, check=0)
    settings = read_json(tmp / "m" / "args.json")["settings"]
    assert settings["schedule"] == {"value": "onecycle", "source": "sft default"}
    assert settings["beta2"] == {"value": 0.95, "source": "sft default"}
    assert "AdamW betas (0.9, 0.95)" in p.stdout and "--schedule onecycle" in p.stdout


def test_download_data_trains_on_the_served_pairs(tmp):
    """The whole command against a local HTTP server: download, convert CSV, count bad rows, train."""
    (tmp / "www").mkdir()
    rows = [f"show line {i} of notes.txt,sed -n {i}p notes.txt,prints line {i}" for i in range(1, 81)]
    (tmp / "www" / "cmds.csv").write_text("description,command,explanation\n" + "\n".join(rows) + "\n,,\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp / "www"))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/cmds.csv"
    try:
        (tmp / "mine.jsonl").write_text(json.dumps({"input": "where am i", "output": "<command>pwd</command>"}) + "\n")
        p = run("train_sft.py", *TINY, "--data", "mine.jsonl", "--download-data", url,
                "--batch-size", "8", "--grad-accum", "1", "--max-steps", "2", "--out", "dl", cwd=tmp, check=0)
    finally:
        srv.shutdown()
        srv.server_close()
    assert f"--download-data {url}: 80 pairs, 1 bad rows skipped" in p.stdout
    assert len(list((tmp / "data" / "downloads").glob("*-cmds.csv"))) == 1 and \
        not list((tmp / "data" / "downloads").glob("*.part"))
    pairs = [{"input": f"show line {i} of notes.txt"} for i in range(1, 81)] + [{"input": "where am i"}]
    s = read_json(tmp / "dl" / "summary.json")
    assert s["test_pairs"] == sum(train_sft.split_of(q) == 0 for q in pairs) > 0


def test_resume_reproduces_and_init_from_a_pretrained_run(tmp):
    flags = ["--quick", *TINY, *few_pairs(tmp), "--batch-size", "4", "--grad-accum", "2", "--log-every", "3",
             "--eval-every", "3"]
    run("train_sft.py", *flags, "--max-steps", "6", "--save-every", "3", "--out", "one", cwd=tmp, check=0)
    # the run as if it had been killed after step 3: only that checkpoint, re-run the same command
    (tmp / "two" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp / "one" / "checkpoints" / "ckpt_step00000003.pt", tmp / "two" / "checkpoints")
    p = run("train_sft.py", *flags, "--max-steps", "6", "--save-every", "3", "--out", "two", cwd=tmp, check=0)
    assert "resumed from" in p.stdout and "(step 3)" in p.stdout
    keep = ("step", "loss", "val_loss")
    one, two = [[{k: r[k] for k in keep if k in r} for r in metrics(tmp / o) if r["step"] > 3] for o in ("one", "two")]
    assert one == two and len(one) == 2, (one, two)  # step 6: the same loss and val loss, to the digit
    w1, w2 = [torch.load(tmp / o / "checkpoints" / "ckpt_step00000006.pt", weights_only=True)["model"]
              for o in ("one", "two")]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # --init-from an lm run: shape from there, vocabulary grown by the 8 specials, position table grown
    run("train_lm.py", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--grad-accum", "1", "--eval-tokens", "256", "--max-steps", "2", "--out", "lm", cwd=tmp, check=0)
    p = run("train_sft.py", "--quick", "--init-from", "lm", *few_pairs(tmp), "--seq-len", "160",
            "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--out", "ft", cwd=tmp, check=0)
    assert "wte.weight (257, 32) -> (265, 32)" in p.stdout and "wpe.weight (32, 32) -> (160, 32)" in p.stdout
    lm = torch.load(tmp / "lm" / "checkpoints" / "best.pt", weights_only=True)["model"]
    ft = torch.load(sorted((tmp / "ft" / "checkpoints").glob("ckpt_*.pt"))[0], weights_only=True)
    assert ft["task"] == "sft" and ft["model_cfg"]["d_model"] == 32
    p = call("train_sft.py", "--init-from", "lm", "--d-model", "64", "--out", "ft2", cwd=tmp)
    assert p.returncode == 2 and "the shape comes from --init-from" in p.stderr
    assert lm["wte.weight"].shape == (257, 32)
    p = call("train_sft.py", "ask", "--out", "lm", "list files", cwd=tmp)
    assert p.returncode == 2 and "ask needs a fine-tuned run" in p.stderr


def test_validation_oom_halves_its_batch_and_keeps_it(tmp, monkeypatch):
    # the audit: an out-of-memory error in validation ended the run; now the batch halves (8 -> 4
    # -> 2 here), the size that fitted is kept for the next evaluation, and the loss is the same
    real = train_sft.evaluate_sft
    flags = ["--quick", *TINY, *few_pairs(tmp), "--batch-size", "8", "--grad-accum", "1", "--max-steps", "2"]

    def losses(out, fits):
        seen = []

        def evaluate_sft(model, examples, device, amp_dtype, bs, seq_len):
            if bs > fits:
                seen.append("oom")
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            seen.append(real(model, examples, device, amp_dtype, bs, seq_len))  # metrics.jsonl rounds it
            return seen[-1]
        monkeypatch.setattr(train_sft, "evaluate_sft", evaluate_sft)
        p = call("train_sft.py", *flags, "--out", out, cwd=tmp)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr
        return seen, p.stdout
    ref, _ = losses("ref", 8)
    got, stdout = losses("oom", 2)
    assert got[:2] == ["oom", "oom"] and "oom" not in got[2:]  # halved twice, then kept
    assert [line.split("] ")[-1] for line in stdout.splitlines() if "out of memory" in line] == [
        "out of memory in evaluation: its batch halved to 4; evaluating again",
        "out of memory in evaluation: its batch halved to 2; evaluating again"]
    assert len(ref) == len(got[2:]) == 2  # the last step's evaluation, then the report's
    assert got[2:] == pytest.approx(ref, rel=1e-6)
    assert read_json(tmp / "oom" / "summary.json")["steps"] == 2


def test_eval_only_reproduces_val_loss_and_command_accuracy_and_writes_nothing_else(tmp):
    """report() scores the model as the loop left it: the weights of the last step's checkpoint
    (ckpt_step00000006.pt: a run always saves at its last step), the val loss at the checkpoint's
    micro-batch, then greedy decoding of the test pairs. So --eval-only --resume that file gives
    summary.json's val loss (both rounded to 6 decimals: measured equal) and command accuracy."""
    flags = ["--quick", *TINY, *few_pairs(tmp), "--batch-size", "4", "--grad-accum", "2", "--max-steps", "6",
             "--eval-every", "3"]
    run("train_sft.py", *flags, "--out", "r", cwd=tmp, check=0)
    s, before = read_json(tmp / "r" / "summary.json"), tree_digest(tmp / "r")
    p = run("train_sft.py", *flags, "--eval-only", "--out", "r", "--resume", "r/checkpoints/ckpt_step00000006.pt",
            cwd=tmp, check=0)
    e = read_json(tmp / "r" / "eval.json")
    assert e["metric"] == "val_loss" and e["step"] == 6 and e["checkpoint"].endswith("ckpt_step00000006.pt"), e
    assert abs(e["value"] - s["value"]) <= 1e-6 and e["val_loss"] == e["value"], (e, s)
    keys = ("command_exact", "command_substring", "test_pairs")
    assert {k: e[k] for k in keys} == {k: s[k] for k in keys} and e["val_pairs"] > 0, (e, s)
    assert "eval: test command accuracy" in p.stdout and f"val loss {s['value']:.4f} nats" in p.stdout
    # checkpoints, status.json, metrics.jsonl, train.log, summary.json: all as they were
    assert tree_digest(tmp / "r", skip="eval.json") == before
    # a folder with no checkpoint: one line, exit 2, nothing made
    p = call("train_sft.py", *flags, "--eval-only", "--out", "empty", cwd=tmp)
    assert p.returncode == 2 and "--out empty: no checkpoint there" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp / "empty").exists()


def test_tensorboard_gets_the_log_lines_and_the_validations(tmp):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run("train_sft.py", "--quick", *TINY, *few_pairs(tmp), "--batch-size", "4", "--grad-accum", "1", "--max-steps", "4",
        "--log-every", "2", "--eval-every", "2", "--tensorboard", "--out", "r", cwd=tmp, check=0)
    assert list((tmp / "r" / "tb").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tmp / "r" / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss"} <= tags, tags
    assert [e.step for e in ea.Scalars("train/loss")] == [e.step for e in ea.Scalars("eval/val_loss")] == [2, 4]
    recs = metrics(tmp / "r")  # the same numbers (TensorBoard keeps float32)
    assert [e.value for e in ea.Scalars("eval/val_loss")] == pytest.approx([r["val_loss"] for r in recs
                                                                            if "val_loss" in r], abs=1e-5)


def test_continuous_learning_rounds(sft_run, tmp):
    d, out, _ = sft_run
    db = tmp / "fb.db"

    def add(n, start):  # rows as ask would log them, rated good
        ids = [train_sft.log_interaction(db, f"please list files number {start + i}",
                                        "<command>ls</command> Lists the files.") for i in range(n)]
        for i in ids:
            train_sft.rate_interaction(db, i, 1, success=1)
        return ids

    first = add(4, 0)
    bad = train_sft.log_interaction(db, "   ", "<command>ls</command>")  # empty request: skipped, warned
    train_sft.rate_interaction(db, bad, 1, success=1)
    p = popen("train_sft.py", *QUICK, "--out", str(out), "--continuous-learning", "--feedback-db", str(db),
              "--retrain-threshold", "4", "--poll-every", "0.2", "--max-rounds", "2", "--round-epochs", "1", cwd=d)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not any("round" in r for r in metrics(out)):
            time.sleep(0.5)
        second = add(4, 100)
        stdout, _ = p.communicate(timeout=max(10, deadline - time.time()))
    finally:
        p.kill()
    assert p.returncode == 0, stdout[-3000:]
    rounds = [r for r in metrics(out) if "round" in r]
    assert [r["round"] for r in rounds] == [1, 2], stdout[-2000:]
    used = train_sft.used_rows(db)
    assert sorted(i for i, r in used.items() if r == 1) == first  # round 1: exactly the first rows
    assert sorted(i for i, r in used.items() if r == 2) == second  # round 2: only the new ones
    assert bad not in used and stdout.count(f"interaction {bad} skipped") == 1
    assert all(r["rows"] == 4 and "kept" in r and "test_exact_after" in r for r in rounds)
    st = read_json(out / "status.json")
    assert st["round"] == 2 and st["state"] == "finished" and st["last_round"]["round"] == 2
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()
