"""train_classifier.py: LoRA by hand, the built-in data, and the script end to end on CPU."""
import re
import sys
from pathlib import Path

import pytest
import torch

import train_classifier as tcl
from conftest import assert_plan_near_peak, call, read_json, run

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
import tiny_checkpoints as tc  # noqa: E402


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_with_b_zero_is_the_base_layer_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 12)
    lora = tcl.LoRALinear(base, r=4, alpha=8, dropout=0.0)
    x = torch.randn(5, 24)
    assert torch.equal(lora(x), base(x))
    assert not lora.weight.requires_grad and lora.lora_A.requires_grad and lora.lora_B.requires_grad


def test_merged_lora_equals_unmerged():
    torch.manual_seed(0)
    model = tcl.Encoder(50, 3, n_layers=2, dim=16, n_heads=2, hidden_dim=32, max_pos=16, type_vocab=0)
    tcl.add_lora(model, ["q", "k", "v", "o", "ffn"], r=4, alpha=8, dropout=0.1)
    for m in model.modules():
        if isinstance(m, tcl.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)  # a trained adapter, not the zero init
    model.eval()
    ids = torch.randint(5, 50, (3, 9))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 6:] = False
    before = model(ids, mask)
    tcl.merge_lora(model)
    assert not any(isinstance(m, tcl.LoRALinear) for m in model.modules())
    assert torch.allclose(model(ids, mask), before, atol=1e-5)
    assert not torch.allclose(before, tcl.Encoder(50, 3, n_layers=2, dim=16, n_heads=2, hidden_dim=32,
                                                  max_pos=16, type_vocab=0).eval()(ids, mask), atol=1e-3)


def test_distilbert_shape_with_the_seed_lora_has_891656_trainable():
    model = tcl.Encoder(30522, 8, **tcl.PRESETS["distilbert"])
    tcl.add_lora(model, ["q", "v"], r=16, alpha=32, dropout=0.1)
    total, trainable = (sum(p.numel() for p in model.parameters() if c(p)) for c in (lambda p: True,
                                                                                   lambda p: p.requires_grad))
    assert trainable == 891_656
    assert total - trainable == 66_362_880  # the frozen DistilBERT backbone
    # 1.33%; PEFT printed 1.31% because it also counted frozen copies of the saved head modules
    assert round(100 * trainable / total, 2) == 1.33


# -- data ------------------------------------------------------------------------------------------

# -- fasttext and the TF-IDF SVM beside it -------------------------------------------------------

def test_tfidf_weights_give_two_unit_tf_idf_blocks():
    # the SVM reads sum over positions of w[pos] * onehot(id[pos]); that must be the row's tf * idf
    # vector with its words and its character n-grams each scaled to unit length, repeats included
    torch.manual_seed(0)
    lin = tcl.TfidfSVM(12, 3)
    lin.idf.copy_(torch.rand(12) * 3 + 1)
    lin.char[6:] = 1  # ids 6-11: character n-grams
    ids = torch.tensor([[3, 5, 3, 7, 3, 8, 0], [1, 1, 2, 0, 0, 0, 0]])
    mask = ids != 0
    w = lin.tfidf(ids, mask)
    for row in range(2):
        got = torch.zeros(12).index_add_(0, ids[row], w[row])
        v = torch.bincount(ids[row][mask[row]], minlength=12).float() * lin.idf
        words, chars = v * (1 - lin.char), v * lin.char
        want = words / words.norm() + (chars / chars.norm() if chars.any() else 0)
        torch.testing.assert_close(got, want)


def svm_objective(lin, d, W, b, C):
    """The squared hinge of each class against the rest, summed, + |W|^2 / 2C (scikit-learn's LinearSVC / C)."""
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), d["mask"].sum(1).cumsum(0)[:-1]])
    scores = torch.nn.functional.embedding_bag(d["ids"][d["mask"]], W, offsets, mode="sum",
                                               per_sample_weights=lin.tfidf(d["ids"], d["mask"])[d["mask"]]) + b
    sign = torch.nn.functional.one_hot(d["y"], W.shape[1]) * 2 - 1
    return (1 - sign * scores).clamp(min=0).square().sum() + (W ** 2).sum() / (2 * C)


def test_fit_svm_reaches_the_penalised_optimum_and_the_ensemble_averages_probabilities():
    train, val, _ = tcl.generate_items(300, seed=2)
    tok = tcl.NgramTokenizer(tcl.build_ngram_vocab([t for t, _ in train], 200_000, 64))
    data = tcl.encode_splits(tok, (train, val, val), tcl.CATEGORIES, 64)
    model = tcl.FastText(len(tok.itos), len(tcl.CATEGORIES), 16, svm=1.0)
    logs = []
    tcl.fit_svm(model.linear, data["train"], tok.itos, 1.0, logs.append)
    lin, d = model.linear, data["train"]
    assert "fitted by L-BFGS" in logs[0] and not lin.weight.requires_grad and "300 iterations" not in logs[0]
    assert lin.char.sum() == sum(f.startswith("#") for f in tok.itos) > 0
    # the optimum of the convex objective: its gradient is ~0 (at W = 0, b = 0 the bias's is ~4e2: the items of
    # a class minus the others, x 2), and no nearby point is lower
    W, b = lin.weight.detach().clone().requires_grad_(True), lin.bias.detach().clone().requires_grad_(True)
    loss = svm_objective(lin, d, W, b, 1.0)
    loss.backward()
    assert W.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-2, (W.grad.abs().max(), b.grad.abs().max())
    with torch.no_grad():
        for scale in (1e-2, 1e-3):
            assert svm_objective(lin, d, W + scale * torch.randn_like(W), b, 1.0) > loss
    v = data["val"]
    with torch.no_grad():
        assert (lin(v["ids"], v["mask"]).argmax(-1) == v["y"]).float().mean() >= 0.9  # learns: chance is 1/8
        model.eval()
        both = model(v["ids"], v["mask"]).exp()
        model.linear = None
        alone = model(v["ids"], v["mask"]).softmax(-1)
        torch.testing.assert_close(both, (alone + (tcl.SVM_SCALE * lin(v["ids"], v["mask"])).softmax(-1)) / 2)


def test_fit_svm_with_resource_efficients_short_history_reaches_the_same_optimum():
    """--resource-efficient keeps 10 L-BFGS steps instead of 100 (each two vectors the size of the
    weights); the objective is convex, so the fit ends at the same optimum: the same weights to 1e-3 of
    their scale, and the same predictions."""
    train, val, _ = tcl.generate_items(300, seed=2)
    tok = tcl.NgramTokenizer(tcl.build_ngram_vocab([t for t, _ in train], 200_000, 64))
    data = tcl.encode_splits(tok, (train, val, val), tcl.CATEGORIES, 64)
    fits, logs = [], []
    for history in (100, 10):
        lin = tcl.FastText(len(tok.itos), len(tcl.CATEGORIES), 16, svm=1.0).linear
        tcl.fit_svm(lin, data["train"], tok.itos, 1.0, logs.append, history=history)
        fits.append(lin)
    assert "(history 100)" in logs[0] and "(history 10)" in logs[1]
    scale = fits[0].weight.abs().max()
    assert (fits[0].weight - fits[1].weight).abs().max() < 1e-3 * scale
    v = data["val"]
    with torch.no_grad():
        assert torch.equal(fits[0](v["ids"], v["mask"]).argmax(-1), fits[1](v["ids"], v["mask"]).argmax(-1))


def test_resource_efficient_fits_the_svm_with_a_short_history(tmp):
    """The setting reaches the run: the preset's table names it and the fit says which history it kept."""
    p = run("train_classifier.py", *TINY[:4], "--resource-efficient", "--out", "re", cwd=tmp, check=0)
    assert re.search(r"L-BFGS history +100 -> 10 ", p.stdout), p.stdout
    assert "fitted by L-BFGS" in p.stdout and "(history 10)" in p.stdout


def test_a_run_without_the_svm_resumes_as_it_was_and_other_c_is_refused(tmp):
    # --svm-c 0 saves the shape runs from before the SVM had (no "svm" key)
    run("train_classifier.py", "--quick", "--svm-c", "0", "--max-steps", "4", "--out", "r", cwd=tmp, check=0)
    p = run("train_classifier.py", "--quick", "--max-steps", "8", "--out", "r", cwd=tmp, check=0)  # default flags
    assert "resumed from" in p.stdout and "TF-IDF" not in p.stdout
    assert read_json(tmp / "r" / "args.json")["settings"]["svm_c"] == {"value": 0.0, "source": "checkpoint"}
    p = call("train_classifier.py", "--quick", "--max-steps", "12", "--svm-c", "10", "--out", "r", cwd=tmp)
    assert p.returncode == 2 and "was trained with other model shape" in p.stdout + p.stderr
    # a run from before the SVM (its shape has "linear": C) is refused on resume with one line that says so
    ckpt = sorted((tmp / "r" / "checkpoints").glob("ckpt_step*.pt"))[-1]
    state = torch.load(ckpt, weights_only=True)
    state["extra"]["shape"]["linear"] = 30.0
    (tmp / "old" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp / "old" / "checkpoints" / ckpt.name)  # no .sha256: as checkpoints from before them
    p = call("train_classifier.py", "--quick", "--max-steps", "12", "--out", "old", cwd=tmp)
    assert p.returncode == 2 and "is from an older train_classifier.py" in p.stderr and "--no-resume" in p.stderr


def test_svm_c_0_trains_fasttext_alone(tmp):
    p = run("train_classifier.py", "--quick", "--svm-c", "0", "--out", "f", cwd=tmp, check=0)
    assert "TF-IDF" not in p.stdout and "every weight trains" in p.stdout
    weights = torch.load(tmp / "f" / "model.pt", weights_only=True)["model"]
    assert not any(k.startswith("linear.") for k in weights) and "embeddings.weight" in weights
    assert read_json(tmp / "f" / "summary.json")["value"] >= 0.9
    p = run("train_classifier.py", "--predict", "UBER *TRIP 12.50", "--out", "f", cwd=tmp, check=0)
    assert "Transportation" in p.stdout


def test_builtin_items_share_no_text_between_splits_and_cover_every_label():
    train, val, test = tcl.generate_items(840, seed=0)
    assert len(train) == 840 and 170 <= len(val) <= 190 and 170 <= len(test) <= 190
    texts = [{t.lower() for t, _ in s} for s in (train, val, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for s in (train, val, test):
        assert {l for _, l in s} == set(tcl.CATEGORIES)


# -- the script ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("clf")
    # --measure-peak: on a CPU the profiler measures the peak beside the plan only under that flag
    p = run("train_classifier.py", "--quick", "--measure-peak", "--out", "runs/c", cwd=d, check=0)
    return d, d / "runs" / "c", p


def test_quick_run_reaches_90_percent_test_accuracy(quick_run):
    # the default from-scratch model is fasttext: chance is 1/8; measured 1.000 (182 items) in 9 s
    d, out, p = quick_run
    s = read_json(out / "summary.json")
    assert s["metric"] == "test_accuracy" and s["value"] >= 0.90, s["value"]
    assert_plan_near_peak(s)
    assert "model: fasttext from scratch" in p.stdout
    assert s["effective_batch"] == read_json(out / "args.json")["chosen"]["effective_batch"] == 16
    assert s["macro_f1"] >= 0.85 and 0 < s["mean_confidence"] <= 1
    assert sum(map(sum, s["confusion_matrix"])) == sum(c["support"] for c in s["per_class"].values())
    assert read_json(out / "status.json")["state"] == "finished"
    assert not (out / "tb").exists() and not (out / "eval.json").exists()  # neither without its flag
    assert "CPU cores:" in p.stdout and "CUDA available:" in p.stdout
    assert "TF-IDF linear SVM beside fasttext (C 1): fitted by L-BFGS" in p.stdout
    assert "the rest is the TF-IDF SVM beside fasttext, fitted before training" in p.stdout
    # the SVM alone is already perfect on the built-in val rows at epoch 1: the tie in
    # accuracy goes to the lower val loss, so the run trains on (it stopped after 4 of 5 epochs,
    # keeping epoch 1's barely trained fasttext, before ties were broken)
    assert s["epochs"] == tcl.FASTTEXT_EPOCHS // 2 and s["best_val_accuracy"] == 1.0 and s["svm_c"] == 1
    assert len(list((out / "checkpoints").glob("ckpt_step*.pt"))) <= 2 and (out / "checkpoints" / "best.pt").exists()
    pytest.importorskip("matplotlib")
    for png in ("category_distribution", "training_progress", "confusion_matrix", "summary_card"):
        assert (out / "visualizations" / f"{png}.png").stat().st_size > 5000


def test_resource_efficient_fasttext_holds_under_0_7x_the_peak_tensors_and_refuses_a_mixed_resume(quick_run):
    """--resource-efficient gives fasttext sparse embedding gradients and Adagrad: no dense gradient of the
    n-gram table and one state tensor where AdamW keeps two, so the peak of live tensors (the trainer's own
    --measure-peak) stays under 0.7x of the standard --quick run's (measured 0.57x: docs/run-contract.md).
    Its checkpoint holds Adagrad's state, which a standard run (AdamW) cannot go on from: one error line."""
    d, out, _ = quick_run
    p = run("train_classifier.py", "--quick", "--max-steps", "6", "--measure-peak", "--resource-efficient",
            "--out", "re", cwd=d, check=0)
    assert re.search(r"optim +adamw -> adagrad +fasttext: sparse", p.stdout), p.stdout
    a, s, std = read_json(d / "re" / "args.json"), read_json(d / "re" / "summary.json"), read_json(out / "summary.json")
    assert a["settings"]["clip"] == {"value": 0.0, "source": "resource-efficient"}
    assert s["peak_tensor_mb"] <= 0.7 * std["peak_tensor_mb"], (s["peak_tensor_mb"], std["peak_tensor_mb"])
    p = call("train_classifier.py", "--quick", "--max-steps", "8", "--out", "re", cwd=d)
    assert p.returncode == 2 and "trained with Adagrad (--resource-efficient), this run builds AdamW" in p.stdout + p.stderr


def test_one_plain_line_per_log_interval_reaches_train_log(quick_run):
    # common.log_step: step, loss, lr, ms/step, items/s, memory, every --log-every steps (default here: 10 of
    # the 53 steps an epoch) and at the last step; the same line on the console, above the bar
    d, out, p = quick_run
    lines = [l for l in (out / "train.log").read_text().splitlines()
             if re.search(r"step +\d+/\d+ \| loss [\d.]+ \| lr \S+ \| \d+ ms/step \| [\d,]+ items/s \| RAM \d+ MB", l)]
    steps = [int(re.search(r"step +(\d+)/", l).group(1)) for l in lines]
    total = read_json(out / "summary.json")["steps"]
    assert set(range(10, total + 1, 10)) <= set(steps) and all(s % 10 == 0 or s == total for s in steps), steps
    assert all(l.split(" ", 2)[2] in p.stdout for l in lines)  # train.log prefixes its timestamp


def test_the_measured_defaults_are_recorded_in_args_json(quick_run, tmp):
    d, out, _ = quick_run
    settings = read_json(out / "args.json")["settings"]
    assert settings["preset"] == {"value": "fasttext", "source": "default"} and "model" not in settings
    assert settings["lr"] == {"value": tcl.FASTTEXT_LR, "source": "auto"}
    assert settings["epochs"] == {"value": tcl.FASTTEXT_EPOCHS // 2, "source": "auto"}  # --quick: half
    assert settings["vocab_size"] == {"value": 200_000, "source": "auto"}
    # --pretrained: LoRA at its own lr, on mean pooling (a tiny checkpoint, 1 step)
    tc.write_checkpoint(tmp / "tiny", "bert", "safetensors")
    run("train_classifier.py", "--pretrained", "tiny", "--max-steps", "1", "--max-len", "24", "--out", "p",
        cwd=tmp, check=0)
    settings = read_json(tmp / "p" / "args.json")["settings"]
    assert settings["pooling"] == {"value": "mean", "source": "auto"}
    assert settings["lr"] == {"value": tcl.LORA_LR, "source": "auto"}
    assert settings["epochs"] == {"value": tcl.PRETRAINED_EPOCHS, "source": "auto"}
    assert settings["clip"] == {"value": 0.0, "source": "auto"}  # LoRA: no clipping (docs/classifier.md)
    head = torch.load(tmp / "p" / "checkpoints" / "best.pt", weights_only=True)["model"]["classifier.weight"]
    assert head.std() > 2 * 0.02  # the new head starts as nn.Linear does (std 1/sqrt(3 dim)), not BERT's N(0, 0.02)
    p = run("train_classifier.py", "--pretrained", "tiny", "--max-steps", "2", "--max-len", "24", "--lora-r", "8",
            "--out", "p", cwd=tmp, check=2)
    assert "was trained with other LoRA settings" in p.stderr
    # a LoRA run that trained with a clip (a typed one, or 1.0 before the default was 0) keeps it on a plain re-run
    lora = ["train_classifier.py", "--pretrained", "tiny", "--max-len", "24", "--out", "q"]
    run(*lora, "--max-steps", "1", "--clip", "1", cwd=tmp, check=0)
    run(*lora, "--max-steps", "2", cwd=tmp, check=0)
    assert read_json(tmp / "q" / "args.json")["settings"]["clip"] == {"value": 1.0, "source": "checkpoint"}


def test_test_data_alone_splits_validation_off_the_training_file(tmp):
    import csv
    train, _, test = tcl.generate_items(400, seed=3)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with open(tmp / name, "w", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *rows])
    p = run("train_classifier.py", "--data", "train.csv", "--test-data", "test.csv", "--epochs", "2",
            "--out", "r", cwd=tmp, check=0)
    per_label = {l: sum(1 for _, x in train if x == l) for l in tcl.CATEGORIES}
    n_val = len(train) - len(tcl.stratified_split(train, 1337, 0.85)[0])  # the trainer's --seed 1337
    assert "validation split off it: 15%, stratified by label" in p.stdout
    assert f"{len(train) - n_val} train / {n_val} val / {len(test)} test" in p.stdout
    assert abs(n_val - 0.15 * len(train)) <= len(per_label)  # 15%, rounded per label
    s = read_json(tmp / "r" / "summary.json")
    assert sum(c["support"] for c in s["per_class"].values()) == len(test) and s["value"] >= 0.8


def test_predict_on_a_run_folder(quick_run, tmp):
    d, out, _ = quick_run
    p = run("train_classifier.py", "--predict", "UBER *TRIP 12.50", "--out", out, cwd=tmp, check=0)
    label_line, probs_line = p.stdout.splitlines()[1:3]
    assert label_line.split()[0] == "Transportation"
    assert len([w for w in probs_line.split() if w.endswith("%")]) == 3
    (tmp / "items.txt").write_text("Electric bill - ConEd $84.20\n\nSTARBUCKS #1234 4.75\n")
    p = run("train_classifier.py", "--predict-file", "items.txt", "--out", out, cwd=tmp, check=0)
    assert [l.split()[0] for l in p.stdout.splitlines()[1::2]] == ["Utilities", "Food"]
    # a run from before the SVM (fasttext + a logistic regression, shape key "linear") is one line, not a traceback
    state = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    state["extra"]["shape"]["linear"] = state["extra"]["shape"].pop("svm")
    (tmp / "old" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp / "old" / "checkpoints" / "best.pt")  # no .sha256: as checkpoints from before them
    p = call("train_classifier.py", "--predict", "UBER *TRIP 12.50", "--out", "old", cwd=tmp)
    assert p.returncode == 2 and "from an older train_classifier.py" in p.stderr and "Traceback" not in p.stderr


def test_pretrained_tiny_distilbert_trains_lora_and_exports(tmp):
    tc.write_checkpoint(tmp / "tiny", "distilbert", "safetensors")
    p = run("train_classifier.py", "--pretrained", "tiny", "--max-steps", "3", "--max-len", "24", "--merge",
            "--out", "r", cwd=tmp, check=0)
    assert "LoRA r 16, alpha 32 on q,v, lr 0.001, no gradient clipping" in p.stdout and "missing" not in p.stdout
    adapter = torch.load(tmp / "r" / "adapter.pt", weights_only=True)["adapter"]
    assert set(k.split(".")[-1] for k in adapter) >= {"lora_A", "lora_B"}
    assert all("lora" in k or k.startswith(("pre_classifier", "classifier")) for k in adapter)
    merged = torch.load(tmp / "r" / "model.pt", weights_only=True)["model"]
    assert not any("lora" in k for k in merged)  # --merge: plain weights, loadable without LoRA code


BAD = {
    "nolabel.csv": "text,category\nuber trip,Transportation\n",
    "empty.csv": "",
    "train.csv": "text,label\n" + "".join(f"item {i},{'AB'[i % 2]}\n" for i in range(40)),
    "test.csv": "text,label\nfoo,A\nbar,C\n",
    "val.csv": "text,label\nfoo,A\nbar,B\n",
}


@pytest.mark.parametrize("flags,expect", [
    (["--data", "nolabel.csv"], "--data nolabel.csv: missing column(s) label"),
    (["--data", "empty.csv"], "--data empty.csv: the file is empty"),
    (["--data", "train.csv", "--val-data", "val.csv", "--test-data", "test.csv"],
     "--test-data: label(s) C never occur in the training data"),
    (["--pooling", "mean"], "--pooling chooses what a transformer's head reads"),
    (["--svm-c", "-1"], "--svm-c: must be 0 or a positive number, got -1"),
    (["--svm-c", "nan"], "--svm-c: must be 0 or a positive number, got nan"),
    (["--preset", "small", "--svm-c", "10"], "--svm-c sets the SVM beside fasttext"),
    (["--lora-targets", "q,x"], "--lora-targets q,x"),
    (["--pretrained", "nowhere"], "--pretrained nowhere: no config.json"),
    (["--predict", "uber"], "--predict/--predict-file need --out"),
    (["--eval-only"], "--eval-only: no classifier run under runs/; pass --out RUN"),
    (["--eval-only", "--out", "nowhere"], "--out nowhere: no checkpoint there; train first"),
    (["--eval-only", "--no-resume"], "drop --predict/--predict-file/--no-resume (or --eval-only)"),
])
def test_bad_input_exits_2_with_one_line(tmp, flags, expect):
    for name, text in BAD.items():
        (tmp / name).write_text(text)
    p = call("train_classifier.py", "--quick", *flags, cwd=tmp)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], p.stderr
    assert not (tmp / "runs").exists()  # nothing was created before the check


def test_resume_with_other_model_flags_is_refused_and_the_run_kept(tmp):
    run("train_classifier.py", "--preset", "small", "--train-size", "120", "--max-steps", "2", "--out", "r",
        cwd=tmp, check=0)
    before = read_json(tmp / "r" / "status.json")
    for flags, what in ((["--model", "bert"], "--preset small, not --preset bert: resume with --preset small"),
                        ([], "--preset small, not --preset fasttext"),  # another model kind: its vocabulary too
                        (["--preset", "small", "--max-len", "32"], "other --max-len (64, not 32)"),
                        (["--preset", "small", "--pooling", "mean"], "other model shape")):
        p = run("train_classifier.py", "--train-size", "120", "--max-steps", "4", *flags, "--out", "r",
                cwd=tmp, check=2)
        assert p.stderr.startswith("error: ") and f"was trained with {what}" in p.stderr, p.stderr
    assert read_json(tmp / "r" / "status.json") == before


def test_preset_is_the_model_size_and_model_its_old_spelling(tmp):
    """--preset means model size in every trainer; --model (the flag) and "model" (the key older
    optimal_config.json files wrote) still set it, and args.json records preset alone."""
    assert tcl.parser.parse_args(["--model", "bert"]).preset == "bert"
    (tmp / "optimal_config.json").write_text('{"trainers": {"classifier": {"model": {"value": "small"}}}}')
    p = run("train_classifier.py", "--train-size", "120", "--max-steps", "1", "--out", "c", cwd=tmp, check=0)
    settings = read_json(tmp / "c" / "args.json")["settings"]
    assert settings["preset"] == {"value": "small", "source": "optimal_config.json"} and "model" not in settings
    assert "model: small from scratch" in p.stdout
    (tmp / "optimal_config.json").write_text('{"trainers": {"classifier": {"model": "huge"}}}')
    p = call("train_classifier.py", "--train-size", "120", "--max-steps", "1", "--out", "d", cwd=tmp)
    assert p.returncode == 2 and "classifier.model = 'huge' is invalid" in p.stderr, p.stderr


def test_pretrained_checkpoints_that_do_not_fit_are_user_errors(tmp):
    import json as _json
    tc.write_checkpoint(tmp / "b", "bert", "bin")
    (tmp / "b" / "pytorch_model.bin").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    p = run("train_classifier.py", "--pretrained", "b", "--out", "x", cwd=tmp, check=2)
    assert "not a readable weights file" in p.stderr
    tc.write_checkpoint(tmp / "m", "bert", "safetensors")
    cfg = _json.loads((tmp / "m" / "config.json").read_text())
    (tmp / "m" / "config.json").write_text(_json.dumps(dict(cfg, model_type="mpnet")))
    p = run("train_classifier.py", "--pretrained", "m", "--out", "x", cwd=tmp, check=2)
    assert "only bert and distilbert" in p.stderr
    assert not (tmp / "x").exists()


def test_early_stopping_counts_improvements_made_between_epoch_ends(tmp):
    # frequent evaluations: the end-of-epoch one rarely beats the one just before it, which must
    # not make the epoch count as "no improvement" (patience 1 would then stop after epoch 1)
    tc.write_checkpoint(tmp / "d", "distilbert", "safetensors")
    p = run("train_classifier.py", "--pretrained", "d", "--train-size", "200", "--epochs", "2", "--patience", "1",
            "--eval-every", "2", "--max-len", "24", "--out", "e", cwd=tmp, check=0)
    assert read_json(tmp / "e" / "summary.json")["epochs"] == 2, p.stdout[-2000:]


def test_real_data_benchmark_pairs_arms_and_its_scikit_learn_arms_learn(tmp, monkeypatch):
    # bench_classifier_real.py's paired table: ours minus each arm over the splits both ran, with its
    # standard error and the ahead / level / behind count; then its scikit-learn arms on the built-in receipts
    # (the Debian rows need the apt index), each far above chance (1/8), or one "skipped" line without sklearn
    import importlib.util
    import statistics
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_classifier_real as bench
    runs = {0: {"ours": {"acc": 0.80, "wall": 3}, "tool": {"acc": 0.78, "wall": 1}},
            1: {"ours": {"acc": 0.70, "wall": 5}, "tool": {"acc": 0.70, "wall": 2}},
            2: {"ours": {"acc": 0.75, "wall": 4}, "tool": {"acc": 0.76, "wall": 9}, "late": {"acc": 0.5, "wall": 1}}}
    table = {row[0]: row[1:] for row in bench.paired_table(runs)}
    se = statistics.stdev([2.0, 0.0, -1.0]) / 3 ** 0.5
    assert table["ours"] == ["0.7500", "", "", "4"]
    assert table["tool"] == ["0.7467", f"+0.33 ± {se:.2f}", "1 / 1 / 1", "2"]
    assert table["late"] == ["0.5000", "+25.00 ± nan", "1 / 0 / 0", "1"]  # one split: no s.e.
    train, val, test = tcl.generate_items(300, seed=1)
    if importlib.util.find_spec("sklearn") is None:
        lines = []
        monkeypatch.setattr(bench, "say", lines.append)
        assert bench.sklearn_arms(train, val, test) == {} and lines == [f"scikit-learn arms {bench.SKIPPED}"]
        return
    results = bench.sklearn_arms(train, val, test)
    assert len(results) == 4 and all(r["acc"] >= 0.8 for r in results.values()), results


def test_a_finished_run_rebuilds_exports_a_kill_lost(tmp):
    # a kill while the exports were written: re-running the same command writes them again from best.pt
    import os
    tc.write_checkpoint(tmp / "tiny", "distilbert", "safetensors")
    flags = ["--pretrained", "tiny", "--max-steps", "2", "--max-len", "24", "--train-size", "120", "--out", "r"]
    run("train_classifier.py", *flags, cwd=tmp, check=0)
    out = tmp / "r"
    assert (out / "model.pt").stat().st_mtime_ns <= (out / "summary.json").stat().st_mtime_ns  # exports first
    (out / "adapter.pt").unlink()
    os.utime(out / "model.pt", (0, 0))  # older than best.pt: an export from an earlier run
    summary = (out / "summary.json").read_bytes()
    p = run("train_classifier.py", *flags, cwd=tmp, check=0)
    assert "already finished" in p.stdout and "rebuilt adapter.pt, model.pt from" in p.stdout, p.stdout[-2000:]
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["model"]
    model = torch.load(out / "model.pt", weights_only=True)["model"]
    adapter = torch.load(out / "adapter.pt", weights_only=True)["adapter"]
    assert model.keys() == best.keys() and all(torch.equal(model[k], best[k]) for k in best)
    assert adapter and all(torch.equal(adapter[k], best[k]) for k in adapter)
    assert (out / "summary.json").read_bytes() == summary
    p = run("train_classifier.py", *flags, cwd=tmp, check=0)  # nothing missing: nothing rebuilt
    assert "rebuilt" not in p.stdout


@pytest.mark.parametrize("trainer", ["gru", "lm"])
def test_another_trainers_run_or_checkpoint_is_one_error_line(tmp, trainer):
    from conftest import tree_digest
    tiny = {"gru": ["train_gru.py", "--quick", "--dataset-size", "300", "--batch-size", "8"],
            "lm": ["train_lm.py", "--n-layer", "2", "--d-model", "32", "--n-head", "2", "--seq-len", "32",
                   "--batch-size", "4", "--eval-tokens", "512"]}[trainer]
    run(*tiny, "--max-steps", "2", "--out", "other", cwd=tmp, check=0)
    ckpt = "other/checkpoints/ckpt_step00000002.pt"
    before = tree_digest(tmp / "other")
    for flags in (["--out", "other"], ["--out", "new", "--resume", ckpt], ["--predict", "uber", "--out", "other"],
                  ["--predict", "uber", "--out", "other", "--resume", ckpt]):
        p = call("train_classifier.py", "--quick", *flags, cwd=tmp)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), (flags, p.stderr)
        assert "train_classifier.py" in lines[0], lines[0]
    assert tree_digest(tmp / "other") == before and not (tmp / "new").exists()


def test_predict_passes_over_an_unloadable_best_pt_and_fails_with_nothing_loadable(quick_run, tmp):
    import shutil
    _, out, _ = quick_run
    shutil.copytree(out, tmp / "c")
    ckpts = tmp / "c" / "checkpoints"
    (ckpts / "best.pt").write_bytes((ckpts / "best.pt").read_bytes()[:1000])  # a truncated copy
    p = run("train_classifier.py", "--predict", "UBER *TRIP 12.50", "--out", "c", cwd=tmp, check=0)
    newest = sorted(ckpts.glob("ckpt_step*.pt"))[-1]
    assert "warning:" in p.stderr and "best.pt is unreadable" in p.stderr, p.stderr
    assert p.stdout.splitlines()[0] == f"model {Path('c') / 'checkpoints' / newest.name}"
    assert p.stdout.splitlines()[1].split()[0] == "Transportation"
    for f in ckpts.glob("ckpt_step*.pt"):
        f.write_bytes(f.read_bytes()[:1000])
    p = run("train_classifier.py", "--predict", "UBER *TRIP 12.50", "--out", "c", cwd=tmp, check=2)
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0] and "--out c" in errors[0], p.stderr
    assert "Traceback" not in p.stderr and not p.stdout


# -- --help, --eval-only, --tensorboard -------------------------------------------------------------

def test_help_states_the_epochs_each_model_gets(tmp, monkeypatch):
    # issue 31: --help said 3, a default no run used; check_flags picks by model, and --help must say what
    import common
    text = " ".join(tcl.parser.format_help().split())
    m = re.search(r"--epochs EPOCHS passes over the training data \(default: by preset: fasttext (\d+), "
                  r"small/distilbert/bert (\d+), --pretrained (\d+); with --quick (\d+), (\d+) and (\d+)\)", text)
    assert m and m.groups() == ("10", "5", "4", "5", "3", "1"), text
    monkeypatch.chdir(tmp)  # no optimal_config.json here
    cases = [[], ["--preset", "small"], ["--pretrained", "x"], ["--quick"], ["--quick", "--preset", "bert"],
             ["--quick", "--pretrained", "x"]]
    for flags, said in zip(cases, m.groups()):
        args, sources = common.resolve_settings(tcl.parser, flags, log=lambda _: None)
        tcl.check_flags(args, sources)
        assert (args.epochs, sources["epochs"]) == (int(said), "auto"), flags


TINY = ["--train-size", "120", "--max-steps", "6", "--eval-every", "2", "--save-every", "2", "--keep", "5"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A fasttext run of 6 steps evaluated at steps 2, 4 and 6, every checkpoint kept; with --tensorboard
    where the package is installed."""
    import importlib.util
    d = tmp_path_factory.mktemp("tiny")
    tb = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []
    p = run("train_classifier.py", *TINY, *tb, "--out", Path("runs") / "r", cwd=d, check=0)
    return d, d / "runs" / "r", p


def test_eval_only_reproduces_the_runs_validation_figure_and_writes_only_eval_json(tiny_run):
    """summary.json's best_val_accuracy is p.best[0], the best evaluation's accuracy (validate); best.pt is
    saved at that evaluation's step with exactly those weights, and finish() scores the test split with
    them. So --eval-only with best.pt must give best.pt's stored [val accuracy, -val loss] (unrounded) to
    1e-6 and summary.json's test figures as rounded there; any other checkpoint, its metrics.jsonl record."""
    from conftest import metrics, tree_digest
    d, out, train = tiny_run
    before = tree_digest(out)
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    p = run("train_classifier.py", *TINY, "--eval-only", "--out", out, "--resume", out / "checkpoints" / "best.pt",
            cwd=d, check=0)
    e, s = read_json(out / "eval.json"), read_json(out / "summary.json")
    assert abs(e["val_accuracy"] - best["best"][0]) <= 1e-6 and abs(e["val_loss"] + best["best"][1]) <= 1e-6, e
    assert round(e["val_accuracy"], 4) == s["best_val_accuracy"]
    assert e["metric"] == s["metric"] == "test_accuracy" and e["checkpoint"] == str((out / "checkpoints" / "best.pt").resolve())
    for key in ("value", "macro_f1", "weighted_f1", "mean_confidence", "per_class", "confusion_matrix"):
        assert e[key] == s[key], key
    # the lines the training run printed: its validation at best.pt's step, and its test report
    log = (out / "train.log").read_text()
    assert f"step {best['step']}: val accuracy {e['val_accuracy']:.3f}, val loss {e['val_loss']:.4f}" in log
    report = p.stdout[p.stdout.index("test accuracy"):].splitlines()[:len(s["labels"]) + 2]
    assert all(line in log for line in report), p.stdout
    assert tree_digest(out, skip="eval.json") == before  # no checkpoint, status.json, metrics.jsonl, log, tb
    # another checkpoint (step 2) reproduces its own record; no --out: the newest classifier run under runs/
    p = run("train_classifier.py", *TINY, "--eval-only", "--resume", out / "checkpoints" / "ckpt_step00000002.pt",
            cwd=d, check=0)
    e, rec = read_json(out / "eval.json"), [r for r in metrics(out) if r["step"] == 2 and "val_acc" in r][0]
    assert (round(e["val_accuracy"], 4), round(e["val_loss"], 5)) == (rec["val_acc"], rec["val_loss"]), (e, rec)
    assert e["step"] == 2 and tree_digest(out, skip="eval.json") == before


def test_eval_only_on_the_same_rows_split_another_way_is_refused(tiny_run):
    """Another --train-size splits the same built-in items another way: its validation and test rows would
    include training rows. One line, exit 2, nothing written."""
    from conftest import tree_digest
    d, out, _ = tiny_run
    before = tree_digest(out)
    p = call("train_classifier.py", *[f if f != "120" else "100" for f in TINY], "--eval-only", "--out", out, cwd=d)
    assert p.returncode == 2 and p.stderr.strip().startswith(
        "error: --eval-only: --train-size 100 (trained with 120): those validation and test splits would hold "
        "rows"), p.stderr
    assert tree_digest(out) == before


def test_eval_only_without_a_checkpoint_is_one_error_line_and_writes_nothing(tmp):
    from conftest import tree_digest
    (tmp / "r").mkdir()
    (tmp / "r" / "notes.txt").write_text("mine\n")
    before = tree_digest(tmp)
    p = call("train_classifier.py", "--eval-only", "--out", "r", cwd=tmp)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out r: no checkpoint"), p.stderr
    assert tree_digest(tmp) == before and not p.stdout


def test_tensorboard_gets_the_log_lines_and_every_evaluation(tiny_run):
    pytest.importorskip("tensorboard")
    from conftest import metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, out, _ = tiny_run
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert {"train/loss", "train/lr", "eval/val_acc", "eval/val_loss"} <= set(ea.Tags()["scalars"]), ea.Tags()
    val = [r for r in metrics(out) if "val_acc" in r]
    assert [(e.step, round(e.value, 4)) for e in ea.Scalars("eval/val_acc")] == [(r["step"], r["val_acc"]) for r in val]
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert [e.step for e in ea.Scalars("train/loss")] == steps


# runs train_classifier.main with a model whose evaluation batches of more than 8 rows run out of memory
OOM_WRAPPER = """import sys
import torch
sys.path.insert(0, {repo!r})
import common
import train_classifier as tcl

forward = tcl.Encoder.forward


def small_forward(self, ids, mask):
    if not self.training and len(ids) > 8:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")
    return forward(self, ids, mask)


tcl.Encoder.forward = small_forward
common.run_main(lambda: tcl.main(sys.argv[1:]))
"""


def test_validation_out_of_memory_halves_its_batch_and_changes_no_number(tmp):
    import subprocess
    from conftest import REPO, metrics
    (tmp / "oom.py").write_text(OOM_WRAPPER.format(repo=str(REPO)))
    flags = ["--preset", "small", "--train-size", "120", "--max-steps", "6", "--eval-every", "2", "--log-every", "1",
             "--precision", "fp32"]  # both runs the same precision, whichever the probe would time faster
    run("train_classifier.py", *flags, "--out", "ref", cwd=tmp, check=0)
    p = subprocess.run([sys.executable, "oom.py", *flags, "--out", "oom"], cwd=tmp, capture_output=True, text=True,
                       timeout=300, env=dict(__import__("os").environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    halvings = [l for l in p.stdout.splitlines() if l.startswith("out of memory in evaluation")]
    # 128 -> 64 -> 32 -> 16 -> 8 once; the later evaluations (steps 4 and 6, the test split) start at 8
    assert len(halvings) == 4 and halvings[-1].endswith("halved to 8; evaluating again"), p.stdout[-3000:]
    ref, got = metrics(tmp / "ref"), metrics(tmp / "oom")
    assert [r.get("loss") for r in got] == [r.get("loss") for r in ref]  # dropout still on after the retries
    assert [r.get("val_acc") for r in got] == [r.get("val_acc") for r in ref]
    assert all(abs(a.get("val_loss", 0) - b.get("val_loss", 0)) <= 1e-4 for a, b in zip(got, ref))
    assert read_json(tmp / "oom" / "summary.json")["value"] == read_json(tmp / "ref" / "summary.json")["value"]
