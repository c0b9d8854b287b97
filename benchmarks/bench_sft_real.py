"""bench_sft_real.py -- train_sft.py against TF-IDF nearest-neighbour retrieval on real pairs.

    python benchmarks/make_man_pairs.py --out /tmp/man/man_pairs.jsonl
    python benchmarks/bench_sft_real.py --data /tmp/man/man_pairs.jsonl --splits 3 --arm plain=
    python benchmarks/bench_sft_real.py --data /tmp/man/man_pairs.jsonl --splits 3 \\
        --arm "quick=--quick" --arm "lr2e-3=--lr 2e-3"

The practitioner's baseline for "English request -> shell command" without a neural net is
retrieval: TF-IDF over the training requests, answer = the command of the most similar one
(cosine). scikit-learn's TfidfVectorizer in three settings (words; words + bigrams, sublinear tf;
character 2-5-grams); per split the one with the best validation exact accuracy is "tfidf", the
baseline every train_sft.py arm is compared with. Install it for the benchmark only:
`pip install scikit-learn`.

Splits: train_sft.py splits by a hash of the request (10 % test, 10 % val, 80 % train); split k
here is the same rule with the hash salted by "split{k}", patched into the real train_sft.py in a
subprocess (nothing else is changed), so every arm of split k trains and scores on the same pairs,
and the baseline retrieves from the same training pairs. The split is by pair: a page's NAME pair
and its EXAMPLES pairs may land on both sides. Retrieval can only answer a command it has seen,
so the table also shows the test pairs whose command appears in the training split ("seen") and
the rest ("unseen", where exact retrieval scores 0 by construction).

Scoring is train_sft.py's own: exact = the command between <command> and </command> equals the
expected one (whitespace-normalised), substring = the expected command appears in the answer.
train_sft.py decodes at most 64 tokens (command_accuracy's max_new), so by default pairs whose
command is longer than 62 characters are left out (--max-command-chars; the count is printed):
the model could never produce them, retrieval could. Runs go under --out and are reused when
their summary.json exists (re-running the same command resumes an interrupted benchmark).
"""

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--data", required=True,
                    help='pairs: a JSONL of {"input", "output"} (make_man_pairs.py writes one)')
parser.add_argument("--splits", type=int, default=5, help="fresh random splits (paired: every arm sees the same)")
parser.add_argument("--first-split", type=int, default=0, help="index of the first split (its salt is split{k})")
parser.add_argument("--arm", action="append", default=[], metavar='NAME="FLAGS"',
                    help="a train_sft.py arm: a name and the flags it adds to the plain command, none for the "
                         "plain defaults (plain=); repeat for more arms")
parser.add_argument("--max-command-chars", type=int, default=62,
                    help="leave out pairs whose command is longer (train_sft.py scores at most 64 decoded "
                         "tokens); 0 keeps all")
parser.add_argument("--jobs", type=int, default=1, help="train_sft.py runs at a time")
parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
parser.add_argument("--out", default="/tmp/bench_sft_real", help="folder for the runs and results.json")


# -----------------------------------------------------------------------------
# the split, the scorer: train_sft.py's rules (imported, not copied, where they can be)

sys.path.insert(0, str(ROOT))
from train_sft import command_of  # noqa: E402  (the scorer's command extraction)

# a subprocess that is train_sft.py with only its split salted and its test answers kept
WRAPPER = r"""
import hashlib, json, sys
sys.path.insert(0, ".")
import common, train_sft
salt, answers_path = sys.argv[1], sys.argv[2]

def split_of(pair):  # train_sft.split_of with a salt: "" gives train_sft.py's own split
    return int(hashlib.sha256((salt + pair["input"].strip().lower()).encode()).hexdigest(), 16) % 10

def command_accuracy(model, pairs, device, **kw):
    exact, sub, answers = scorer(model, pairs, device, **kw)
    with open(answers_path, "w") as f:
        for p, a in zip(pairs, answers):
            f.write(json.dumps({"input": p["input"], "output": p["output"], "answer": a}) + "\n")
    return exact, sub, answers

scorer, train_sft.split_of, train_sft.command_accuracy = train_sft.command_accuracy, split_of, command_accuracy
sys.argv = ["train_sft.py"] + sys.argv[3:]
common.run_main(train_sft.main)
"""


def split_of(pair, salt):
    return int(hashlib.sha256((salt + pair["input"].strip().lower()).encode()).hexdigest(), 16) % 10


def make_split(pairs, salt):
    test, val, train = [], [], []
    for p in pairs:
        (test, val, train)[min(split_of(p, salt), 2)].append(p)
    return train, val, test


def score(pairs, answers):
    """Per pair (exact, substring), as train_sft.command_accuracy counts them."""
    out = []
    for p, a in zip(pairs, answers):
        want = command_of(p["output"])
        out.append((command_of(a) == want, want in " ".join(a.split())))
    return out


# -----------------------------------------------------------------------------
# the baseline: TF-IDF nearest neighbour over the training requests

TFIDF = {
    "words": dict(),
    "words+bigrams": dict(ngram_range=(1, 2), sublinear_tf=True),
    "chars 2-5": dict(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
}


def tfidf_answers(train, queries, settings):
    from sklearn.feature_extraction.text import TfidfVectorizer
    vec = TfidfVectorizer(**settings).fit([p["input"] for p in train])
    sims = vec.transform([q["input"] for q in queries]) @ vec.transform([p["input"] for p in train]).T
    best = sims.argmax(axis=1).A1  # cosine: the rows are L2-normalised; no overlap -> the first pair
    return [train[i]["output"] for i in best]


# -----------------------------------------------------------------------------
# one train_sft.py run

def run_arm(split, salt, name, flags, data_path, out_root, threads):
    out = out_root / f"split{split}" / name
    answers = out / "answers.jsonl"
    if (out / "result.json").exists() and answers.exists():
        return json.loads((out / "result.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", WRAPPER, salt, str(answers), "--data", str(data_path), "--out", str(out),
           "--seed", str(1337 + split), "--config", str(out_root / "no_config.json")] + flags.split()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.time()
    with open(out / "bench.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time, whatever runs beside it
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall, cpu = time.time() - t0, usage.ru_utime + usage.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"split {split} arm {name}: train_sft.py exited {proc.returncode}; see {out / 'bench.log'}")
    summary = json.loads((out / "summary.json").read_text())
    result = {"wall_s": wall, "train_wall_s": summary["wall_s"], "steps": summary["steps"],
              "cpu_s": cpu,
              "exact": summary["command_exact"], "substring": summary["command_substring"],
              "val_loss": summary["value"], "flags": flags}
    (out / "result.json").write_text(json.dumps(result))
    return result


# -----------------------------------------------------------------------------
# main: pairs -> splits -> baseline + arms -> table

def mean_se(xs):
    m = sum(xs) / len(xs)
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
    return m, se


def main():
    args = parser.parse_args()
    arms = []
    for a in args.arm:
        name, _, flags = a.partition("=")
        if "=" not in a or not re.fullmatch(r"[\w.+-]+", name):
            raise SystemExit(f'--arm {a!r}: write NAME="FLAGS", e.g. plain= or lr2e-3="--lr 2e-3"')
        arms.append((name, flags))
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    # a config of our own: no optimal_config.json from the repo root leaks in; loader workers 0 (the
    # standard column's 4 would fork 4 processes per run; batches are the same either way)
    (out_root / "no_config.json").write_text(json.dumps({"trainers": {"sft": {"workers": 0}}}))

    # -- the pairs: train_sft.py keeps the first answer of a request seen twice; so do we
    pairs, seen = [], set()
    for line in open(args.data):
        r = json.loads(line)
        if r["input"] not in seen:
            seen.add(r["input"])
            pairs.append(r)
    n_all = len(pairs)
    if args.max_command_chars:
        pairs = [p for p in pairs if len(command_of(p["output"])) <= args.max_command_chars]
    data_path = out_root / "pairs.jsonl"
    data_path.write_text("".join(json.dumps({"input": p["input"], "output": p["output"]}) + "\n" for p in pairs))
    print(f"data: {args.data}: {n_all} distinct requests; {len(pairs)} with a command of at most "
          f"{args.max_command_chars or 'any'} characters -> {data_path}")

    splits = list(range(args.first_split, args.first_split + args.splits))
    results = {}  # (split, arm) -> {"exact", "substring", "wall_s", ...} with per-subset figures

    # -- the baseline, per split
    subsets = {}
    for k in splits:
        salt = f"split{k}"
        train, val, test = make_split(pairs, salt)
        train_cmds = {command_of(p["output"]) for p in train}
        subsets[k] = {
            "all": [True] * len(test),
            "seen": [command_of(p["output"]) in train_cmds for p in test],
            "unseen": [command_of(p["output"]) not in train_cmds for p in test],
        }
        if any("page" in p for p in test):
            subsets[k]["not gcloud"] = [not p.get("page", "").startswith("gcloud") for p in test]
        print(f"split {k}: {len(train)} train / {len(val)} val / {len(test)} test; test commands seen in "
              f"training: {sum(subsets[k]['seen'])}")
        best = None
        for vname, settings in TFIDF.items():
            t0, c0 = time.time(), time.process_time()
            val_exact = sum(e for e, _ in score(val, tfidf_answers(train, val, settings))) / len(val)
            per = score(test, tfidf_answers(train, test, settings))
            results[k, f"tfidf {vname}"] = {"per": per, "wall_s": time.time() - t0,
                                          "cpu_s": time.process_time() - c0, "val_exact": val_exact}
            if best is None or val_exact > best[0]:
                best = (val_exact, vname)
        results[k, "tfidf"] = dict(results[k, f"tfidf {best[1]}"], chosen=best[1])
        results[k, "_test"] = test

    # -- the train_sft.py arms: every arm on every split, --jobs at a time
    todo = [(k, name, flags) for k in splits for name, flags in arms]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {(k, name): pool.submit(run_arm, k, f"split{k}", name, flags, data_path, out_root, args.threads)
                   for k, name, flags in todo}
        for (k, name), fut in futures.items():
            r = fut.result()
            ans = [json.loads(line) for line in open(out_root / f"split{k}" / name / "answers.jsonl")]
            test = results[k, "_test"]
            if [a["input"] for a in ans] != [p["input"] for p in test]:
                raise SystemExit(f"split {k} arm {name}: train_sft.py's test split differs from ours")
            r["per"] = score(test, [a["answer"] for a in ans])
            results[k, name] = r
            print(f"split {k} {name}: exact {r['exact']:.1%} substring {r['substring']:.1%} "
                  f"val loss {r['val_loss']:.3f}, {r['steps']} steps, {r['wall_s']:.0f}s wall")

    # -- the table: mean over splits per subset, paired difference against tfidf
    names = ["tfidf"] + [f"tfidf {v}" for v in TFIDF] + [n for n, _ in arms]
    chosen = [results[k, "tfidf"]["chosen"] for k in splits]
    print(f"\n{len(splits)} splits ({', '.join(f'split{k}' for k in splits)}); tfidf = the setting with the best "
          f"validation exact accuracy per split: {', '.join(chosen)}")
    table = {}
    for sub in subsets[splits[0]]:
        sizes = [sum(subsets[k][sub]) for k in splits]
        print(f"\ntest pairs: {sub} ({sum(sizes) / len(sizes):.0f} a split on average)")
        print(f"{'arm':<22} {'exact':>7} {'substr':>7} {'exact - tfidf':>17} {'substr - tfidf':>17} "
              f"{'ahead/level/behind':>18} {'wall s':>8} {'cpu s':>7}")
        for name in names:
            ex, sb = [], []
            for k in splits:
                mask = subsets[k][sub]
                per = [p for p, m in zip(results[k, name]["per"], mask) if m]
                ex.append(sum(e for e, _ in per) / max(1, len(per)))
                sb.append(sum(s for _, s in per) / max(1, len(per)))
            table[sub, name] = (ex, sb)
            bex, bsb = table[sub, "tfidf"]
            dex, dsb = mean_se([a - b for a, b in zip(ex, bex)]), mean_se([a - b for a, b in zip(sb, bsb)])
            wall = sum(results[k, name]["wall_s"] for k in splits) / len(splits)
            cpu = sum(results[k, name]["cpu_s"] for k in splits) / len(splits)
            alb = "/".join(str(sum(f(a, b) for a, b in zip(ex, bex))) for f in (
                lambda a, b: a > b, lambda a, b: a == b, lambda a, b: a < b))  # splits, on exact
            diff = "" if name.startswith("tfidf") else \
                f"{dex[0]:+8.1%} ±{dex[1]:5.1%} {dsb[0]:+8.1%} ±{dsb[1]:5.1%} {alb:>18}"
            print(f"{name:<22} {mean_se(ex)[0]:>7.1%} {mean_se(sb)[0]:>7.1%} {diff:>54} {wall:>8.0f} {cpu:>7.0f}")
    summary = {f"{sub} | {name}": {"exact": ex, "substring": sb} for (sub, name), (ex, sb) in table.items()}
    summary["arms"] = dict(arms)
    summary["runs"] = {f"split{k} {n}": {x: v for x, v in results[k, n].items() if x != "per"}
                       for k in splits for n, _ in arms}
    (out_root / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n(± = standard error of the paired difference over splits; ahead/level/behind = splits where the "
          f"arm's exact accuracy is above / equal to / below tfidf's; wall s and cpu s = one run (tfidf: "
          f"its validation and test retrieval), mean over splits, {args.jobs} run(s) at a time, {args.threads} "
          f"thread(s) each; results: {out_root / 'results.json'})")


if __name__ == "__main__":
    main()
