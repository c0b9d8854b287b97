"""train_sft.py -- instruction fine-tuning: plain-English requests -> shell commands.

The seed's Overseer system: a causal LM (train_lm.py's GPT or eigen model, one definition)
fine-tuned on {input, output} pairs with the loss on the answer only, the seed's small-machine
modes, pair files fetched over http(s), and continuous learning from a SQLite store of rated
answers. One visible loop, like train_lm.py's.

    python train_sft.py --out runs/cmd                            # laptop CPU, ~7 min on one core
    python train_sft.py --quick --out runs/cmd-q                  # the shorter demo, ~3 min on 2 cores
    python train_sft.py ask --out runs/cmd "list files by size" "show git status"
    python train_sft.py --quick --out runs/cmd --eval-only        # score its best.pt again: eval.json
    python train_sft.py --cpu-only --out runs/cmd-cpu             # the seed's CPU mode (table at start)
    python train_lm.py --quick --out runs/lm && python train_sft.py --init-from runs/lm --out runs/ft
    python train_sft.py --download-data https://host/pairs.jsonl --sha256 HEX --out runs/dl
    python train_sft.py --quick --out runs/cmd --continuous-learning --feedback-db feedback.db
    python train_sft.py ask --out runs/cmd --feedback-db feedback.db "list files"   # logs the answer
    python train_sft.py rate --feedback-db feedback.db 1 good                        # rates it

Without --data the built-in pairs are used (67 templates over the seed's commands: ls, cd,
grep, find, ps, kill, chmod, tar, git, pip, docker, ...), written to data/shell_commands.jsonl
on first use as a file to read and extend. Re-running the same command resumes.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import UserError
from train_lm import (EOT, LM, VOCAB, add_model_flags, check_flags, check_resume, describe, device_peak, encode,
                      eval_model, flops_per_token, greedy_batch, load_model, log_interval, log_presets, pad_to,
                      make_optimizer, model_config, resolve_shape, resume, save, start, step_loader, stopped, totals)

# -----------------------------------------------------------------------------
# data: English request -> shell command pairs

# The seed's (Overseer) 8 special tokens, after the byte ids and <eot>: an answer is
# "<command>ls -lS</command> Lists files ...", so the command is found without parsing prose.
SFT_SPECIALS = ["<system>", "</system>", "<command>", "</command>", "<file>", "</file>", "<output>", "</output>"]
SFT_IDS = {s: VOCAB + i for i, s in enumerate(SFT_SPECIALS)}
SFT_VOCAB = VOCAB + len(SFT_SPECIALS)
CMD_OPEN, CMD_CLOSE = SFT_IDS["<command>"], SFT_IDS["</command>"]
SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SFT_SPECIALS)) + ")")
DEFAULT_PAIRS = Path("data") / "shell_commands.jsonl"

# The built-in data: one template a line, "request | another phrasing => command => explanation" (a line that starts
# with spaces goes on the one before); {slots} are filled from SLOTS, so one line gives many pairs. The commands cover
# the seed's list (ls cd grep find top ps kill chmod chown tar zip git npm pip docker) and the everyday file tools.
SLOTS = {
    "file": ["notes.txt", "report.pdf", "main.py", "data.csv", "config.yaml", "app.log", "README.md",
             "index.html", "backup.sql", "photo.jpg", "deploy.sh", "server.js", "todo.md", "train.py"],
    "dir": ["src", "logs", "docs", "build", "tmp", "projects", "downloads", "images", "tests", "backup",
            "music", "data"],
    "pattern": ["error", "TODO", "warning", "import", "failed", "localhost", "password", "main"],
    "ext": ["py", "txt", "log", "csv", "md", "json", "jpg", "sh"],
    "user": ["alice", "bob", "deploy", "www-data", "root"], "pid": ["1234", "4321", "987", "2048", "31337", "555"],
    "proc": ["python", "nginx", "node", "java", "postgres", "redis", "firefox"],
    "pkg": ["numpy", "requests", "flask", "torch", "pandas", "pytest", "django", "scipy"],
    "npmpkg": ["express", "react", "lodash", "axios", "typescript"],
    "branch": ["main", "dev", "feature-login", "fix-typo", "release", "hotfix"],
    "image": ["nginx", "redis", "postgres", "ubuntu", "python", "alpine"], "n": ["3", "5", "10", "20", "50"],
    "mode": ["755", "644", "600", "700"], "msg": ["fix bug", "add tests", "update docs", "initial commit", "refactor"],
}
TEMPLATES = """
list files | show the files here | what files are in this folder => ls => Lists the files in the current folder.
list all files including hidden ones | show hidden files => ls -a => -a includes names that start with a dot.
list files by size | show files sorted by size | which files are biggest => ls -lS => -l long format, -S sorted by size,
    largest first.
list files by date | show the newest files first => ls -lt => -t sorts by modification time, newest first.
list files in {dir} | show what is in {dir} => ls {dir} => Lists the files in {dir}.
list files in {dir} with details | long listing of {dir} => ls -l {dir} => -l shows permissions, owner, size and date.
go to {dir} | change directory to {dir} | open the folder {dir} => cd {dir} => Changes the current folder to {dir}.
go up one folder | go to the parent directory => cd .. => .. is the parent folder.
go to my home folder | go home => cd ~ => ~ is your home folder.
search for {pattern} in {file} | find lines with {pattern} in {file} => grep "{pattern}" {file} => Prints the lines of
    {file} that contain {pattern}.
search for {pattern} in all files under {dir} | find {pattern} recursively in {dir} => grep -r "{pattern}" {dir} => -r
    searches every file under {dir}.
count lines with {pattern} in {file} | how many lines of {file} contain {pattern} => grep -c "{pattern}" {file} => -c
    prints the number of matching lines.
search for {pattern} in {file} ignoring case => grep -i "{pattern}" {file} => -i ignores upper and lower case.
find all .{ext} files | find every {ext} file here => find . -name "*.{ext}" => Searches this folder and below for names
    ending in .{ext}.
find .{ext} files in {dir} | find all {ext} files under {dir} => find {dir} -name "*.{ext}" => Searches {dir} and below
    for names ending in .{ext}.
find files bigger than 100MB | find large files => find . -size +100M => -size +100M matches files over 100 MB.
find files changed in the last {n} days | find files modified in the past {n} days => find . -mtime -{n} => -mtime -{n}
    matches files modified less than {n} days ago.
find empty files in {dir} => find {dir} -type f -empty => -empty matches files of size zero.
show running processes | list all processes => ps aux => a: all users, u: with owner and CPU/memory, x: including
    daemons.
find the {proc} process | is {proc} running => ps aux | grep {proc} => Lists processes and keeps the lines that mention
    {proc}.
show cpu usage | which processes use the most cpu => top => top shows processes by CPU use, refreshed live; q quits.
kill process {pid} | stop process {pid} => kill {pid} => Sends SIGTERM to process {pid}.
force kill process {pid} | kill -9 process {pid} => kill -9 {pid} => SIGKILL cannot be ignored by the process.
stop all {proc} processes | kill every {proc} process => pkill {proc} => pkill signals every process named {proc}.
make {file} executable | allow running {file} => chmod +x {file} => +x adds execute permission.
set the permissions of {file} to {mode} | chmod {file} to {mode} => chmod {mode} {file} => Octal permissions {mode} for
    owner, group and others.
change the owner of {file} to {user} | give {file} to {user} => chown {user} {file} => Makes {user} the owner of {file}.
give {user} ownership of {dir} recursively | make {user} own everything in {dir} => chown -R {user} {dir} => -R changes
    {dir} and everything in it.
compress {dir} into a tar.gz archive | make a tarball of {dir} => tar -czf {dir}.tar.gz {dir} => c: create, z: gzip, f:
    archive file name.
extract {dir}.tar.gz | unpack the archive {dir}.tar.gz => tar -xzf {dir}.tar.gz => x: extract, z: gunzip, f: from this
    file.
list the contents of {dir}.tar.gz | what is inside {dir}.tar.gz => tar -tzf {dir}.tar.gz => t lists the archive without
    extracting.
zip the folder {dir} | make a zip file of {dir} => zip -r {dir}.zip {dir} => -r adds the folder and everything in it.
unzip {dir}.zip | extract {dir}.zip => unzip {dir}.zip => Extracts the zip archive into the current folder.
show git status | what changed in the repo => git status => Shows changed, staged and untracked files.
commit with message {msg} | git commit saying {msg} => git commit -m "{msg}" => Records the staged changes with the
    message.
push to {branch} | push my commits to {branch} => git push origin {branch} => Uploads your commits to the {branch}
    branch on origin.
push my changes | upload my commits => git push => Uploads your commits to the remote branch.
pull the latest changes | update the repo => git pull => Fetches and merges the remote branch.
create a branch called {branch} | start a new branch {branch} => git checkout -b {branch} => -b creates the branch and
    switches to it.
switch to branch {branch} | checkout {branch} => git checkout {branch} => Switches the working tree to {branch}.
show the last {n} commits | git log of the last {n} commits => git log -n {n} --oneline => One line per commit, newest
    first.
stage {file} | add {file} to the next commit => git add {file} => Stages {file} for the next commit.
install {pkg} | pip install {pkg} => pip install {pkg} => Installs the Python package {pkg}.
uninstall {pkg} | remove the python package {pkg} => pip uninstall {pkg} => Removes the Python package {pkg}.
upgrade {pkg} | update {pkg} to the latest version => pip install --upgrade {pkg} => --upgrade installs the newest
    version.
list installed python packages | which python packages are installed => pip list => Lists installed packages with
    versions.
save installed packages to requirements.txt | freeze my python packages => pip freeze > requirements.txt => Writes
    name==version lines to requirements.txt.
install {npmpkg} with npm | add the npm package {npmpkg} => npm install {npmpkg} => Installs {npmpkg} into node_modules.
list running containers | show docker containers => docker ps => Lists running containers.
list all containers | show stopped containers too => docker ps -a => -a includes stopped containers.
run a {image} container | start {image} in docker => docker run -d {image} => -d runs the container in the background.
pull the {image} image | download the {image} docker image => docker pull {image} => Downloads the image from the
    registry.
list docker images | show my docker images => docker images => Lists the images stored locally.
show disk usage of this folder | how big is this folder => du -sh . => -s one total, -h human-readable sizes.
show disk usage of {dir} | how big is {dir} => du -sh {dir} => -s one total, -h human-readable sizes.
show free disk space | how much disk space is left => df -h => Free and used space per disk, human-readable.
show memory usage | how much ram is free => free -h => Used and free RAM and swap, human-readable.
copy {file} to {dir} | make a copy of {file} in {dir} => cp {file} {dir}/ => Copies {file} into {dir}.
move {file} to {dir} | put {file} into {dir} => mv {file} {dir}/ => Moves {file} into {dir}.
delete {file} | remove the file {file} => rm {file} => Deletes {file}; there is no undo.
delete the folder {dir} and everything in it => rm -r {dir} => -r removes the folder and its contents; there is no undo.
create a folder called {dir} | make a new directory {dir} => mkdir {dir} => Creates the folder {dir}.
show the contents of {file} | print {file} => cat {file} => Prints the whole file.
show the first {n} lines of {file} => head -n {n} {file} => Prints the first {n} lines.
show the last {n} lines of {file} => tail -n {n} {file} => Prints the last {n} lines.
follow {file} as it grows | watch the log {file} => tail -f {file} => -f keeps printing new lines; Ctrl-C stops.
count the lines in {file} | how many lines does {file} have => wc -l {file} => -l counts lines.
"""
PREFIXES = ["", "please ", "how do I ", "I want to ", "can you "]
# the typo pairs of the seed ("git pus" -> "git push"), made systematic: a misspelt command word
TYPOS = {"git": ["gti", "igt"], "push": ["pus", "psuh"], "pull": ["pul", "pulll"], "status": ["staus", "stauts"],
         "grep": ["grpe", "gerp"], "ls": ["sl"], "cd": ["dc"], "docker": ["dokcer", "docekr"], "pip": ["ipp"],
         "install": ["instal", "isntall"], "mkdir": ["mkdri", "mkidr"], "chmod": ["chmdo", "chomd"],
         "kill": ["kil"], "find": ["fnid"], "python": ["pyhton", "pytohn"], "commit": ["comit", "commti"]}


def format_answer(command, explanation=""):
    return f"<command>{command}</command>" + (f" {explanation}" if explanation else "")


def builtin_pairs(per_template=100):
    """The built-in English -> command pairs, in a fixed order (the same file on every machine). Balanced: every
    template gives up to per_template pairs (slot combinations picked by a fixed permutation, phrasings and polite
    prefixes rotated), so "list files by size" is not drowned by the hundreds of file x folder combinations of "copy
    {file} to {dir}" (measured: with all combinations, 4264 pairs, the tiny model got the rare templates wrong)."""
    pairs, seen = [], set()

    def add(inp, cmd, expl):
        if inp not in seen:
            seen.add(inp)
            pairs.append({"input": inp, "output": format_answer(cmd, expl)})

    for t, line in enumerate(re.sub(r"\n +", " ", TEMPLATES).strip().split("\n")):
        asks, cmd, expl = line.split(" => ")
        phrasings = asks.split(" | ")
        names = list(dict.fromkeys(re.findall(r"{(\w+)}", " ".join(phrasings) + cmd)))
        combos = [{}]
        for name in names:  # every combination of the slots this template uses
            combos = [dict(c, **{name: v}) for c in combos for v in SLOTS[name]]
        order = np.random.default_rng(t).permutation(len(combos))
        for k in range(per_template):
            c = combos[order[k % len(combos)]]
            prefix = PREFIXES[(k // len(phrasings)) % len(PREFIXES)]
            add(prefix + phrasings[k % len(phrasings)].format(**c), cmd.format(**c), expl.format(**c))
    for cmd in sorted({p["output"].split("</command>")[0][len("<command>"):] for p in pairs}):
        words = cmd.split()
        for k, w in enumerate(words[:2]):
            if w in TYPOS:  # one misspelling per command, rotating through the word's typos
                typo = TYPOS[w][len(cmd) % len(TYPOS[w])]
                add(" ".join(words[:k] + [typo] + words[k + 1:]), cmd, f"Corrected the typo: {typo} -> {w}.")
                break
    return pairs


def encode_sft(text):
    """Bytes, with the special-token strings as single ids (only in answers: a user who types
    "<command>" in a request gets the bytes, see render)."""
    return [i for part in SPECIAL_RE.split(text) for i in ([SFT_IDS[part]] if part in SFT_IDS else encode(part))]


def decode_sft(ids):
    """Ids back to text, specials as their strings; stops at <eot>."""
    out, buf = [], bytearray()
    for i in ids:
        if i < 256:
            buf.append(int(i))
            continue
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        if i == EOT:
            break
        out.append(SFT_SPECIALS[i - VOCAB])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def prompt_ids(request):
    return encode(f"User: {request}\nAssistant: ")


def render(pair):
    """(ids, n_prompt): "User: {input}\\nAssistant: {output}<eot>" as token ids; the loss is on
    the ids after the first n_prompt (the answer and its <eot>), the prompt only conditions."""
    p = prompt_ids(pair["input"])
    return p + encode_sft(pair["output"]) + [EOT], len(p)


def command_of(text):
    """The command in an answer: between <command> and </command>, else its first line."""
    m = re.search(r"<command>(.*?)(</command>|$)", text, re.S)
    return " ".join((m.group(1) if m else text.split("\n")[0]).split())


def split_of(pair):
    """0 = test, 1 = val, else train: by a hash of the request, so the split is the same in
    every run and for every --seed, and a request never lands in two splits."""
    return int(hashlib.sha256(pair["input"].strip().lower().encode()).hexdigest(), 16) % 10


def sft_batch(step, examples, seed, global_batch, rank, per_rank, seq_len):
    """This rank's examples of step `step`, padded to the longest, rounded up (pad_to; not to seq_len: the built-in
    pairs are ~130 tokens, so a 2048 context costs nothing until an example needs it). A fresh
    permutation per epoch from (seed, epoch): every example once per epoch, the same on resume and
    on every rank. Returns x (B, L+1) ids (padding <eot>), w (B, L) 1.0 where the target is an
    answer token, and n (B,) real tokens per example (for tokens/s)."""
    idx = global_examples(step, len(examples), seed, global_batch)[rank * per_rank:(rank + 1) * per_rank]
    return collate([examples[i] for i in idx], seq_len)


def global_examples(step, n, seed, global_batch):
    """The indices of step `step`'s whole global batch (every rank's examples)."""
    per_epoch = max(1, n // global_batch)
    epoch, pos = divmod(step, per_epoch)
    order = np.random.default_rng((seed, epoch)).permutation(n)
    return order[pos * global_batch:(pos + 1) * global_batch]


def answer_tokens(step, examples, seed, global_batch, seq_len):
    """The answer tokens (collate's w.sum()) of step `step`'s whole global batch, from the examples'
    lengths alone: under torchrun each rank divides its loss by this / world (train_step's norm),
    so DDP's average is the 1-process gradient though the ranks' answers differ in length."""
    return sum(max(0, min(len(examples[i][0]), seq_len + 1) - examples[i][1])
               for i in global_examples(step, len(examples), seed, global_batch))


def collate(batch, seq_len):
    cut = [(ids[:seq_len + 1], n_prompt) for ids, n_prompt in batch]  # an over-long example is cut at the end
    L = pad_to(max(len(ids) for ids, _ in cut) - 1, seq_len)
    x = torch.full((len(cut), L + 1), EOT, dtype=torch.long)
    w = torch.zeros(len(cut), L)
    for i, (ids, n_prompt) in enumerate(cut):
        x[i, :len(ids)] = torch.tensor(ids)
        w[i, n_prompt - 1:len(ids) - 1] = 1.0  # target j is token j+1: the answer starts at n_prompt
    return {"x": x, "w": w, "n": torch.tensor([len(ids) for ids, _ in cut])}


def sft_loss_fn(model, mb, device):
    """Cross-entropy summed over the answer tokens only (prompt and padding weigh 0), and their
    count: train_step divides by the answer tokens of the whole accumulated batch."""
    w = mb["w"].to(device, non_blocking=True)
    L = pad_to(int(w.nonzero()[:, 1].max()) + 1 if w.any() else 1, w.shape[1])  # the longest answer end, padded
    x = mb["x"][:, :L + 1].to(device, non_blocking=True)
    w = w[:, :L]
    logits = model(x[:, :-1])  # (B, L, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    return (loss * w.flatten()).sum(), w.sum()


# -----------------------------------------------------------------------------
# config: flags, and the seed's modes (settings layered in before anything is built)

parser = common.make_parser(__doc__, trainer="sft", epochs=1, lr=None, effective_batch=32, log_every=10,
                            epochs_help="passes over the training pairs (default: 12 passes, at least 1000 steps; "
                                        "--quick: 600 steps; --epochs N trains N passes instead)")
g = parser.add_argument_group("instruction pairs")
g.add_argument("--data", default=None, metavar="PATH",
               help=f"pairs to fine-tune on: a .jsonl ({{\"input\", \"output\"}} per line) or .csv "
                    f"(description,command,explanation) file, or a folder of them (default: the built-in "
                    f"pairs, copied to {DEFAULT_PAIRS})")
g.add_argument("--download-data", action="append", default=None, metavar="URL",
               help="more pairs: an http(s) URL of a .jsonl or .csv file, or a local file or folder "
                    "of them; repeat for more sources. Downloads resume where they stopped (--data may "
                    "be a URL too; --sha256, --max-download-mb and --download-dir apply to both)")
add_model_flags(parser, seq_len_help="256")
g = parser.add_argument_group("the seed's modes and continuous learning")
g.add_argument("--init-from", default=None, metavar="RUN",
               help="start from the weights of a train_lm.py run folder (its best.pt, else newest "
                    "checkpoint); the model's shape comes from there")
g.add_argument("--mac", action="store_true",
               help="the seed's Apple-laptop mode (batch 1 x 32, lr 3e-5, 256 tokens, fp32; table at "
                    "start). Wins over --cpu-only and --resource-efficient")
g.add_argument("--cpu-only", action="store_true",
               help="the seed's CPU mode (batch 1 x 64, lr 1e-5, 128 tokens, fp32, CPU). Wins over "
                    "--resource-efficient")
g.add_argument("--continuous-learning", action="store_true",
               help="after training, watch --feedback-db and fine-tune on new well-rated interactions "
                    "(rounds kept only if the test split is not worse) until stopped")
g.add_argument("--feedback-db", default=None, metavar="PATH",
               help="SQLite store of ask/rate interactions (table user_interactions)")
g.add_argument("--retrain-threshold", type=common.pos_int, default=100, metavar="N",
               help="continuous learning: start a round when N new well-rated rows exist")
g.add_argument("--replay", type=float, default=0.5, metavar="FRAC",
               help="continuous learning: share of each round's batches drawn from the original "
                    "training pairs (so new rows do not make the model forget)")
g.add_argument("--round-epochs", type=common.pos_int, default=3, metavar="N",
               help="continuous learning: passes over the new rows per round")
g.add_argument("--poll-every", type=common.pos_float, default=30.0, metavar="S",
               help="continuous learning: seconds between looks at --feedback-db")
g.add_argument("--max-rounds", type=common.nonneg_int, default=0, metavar="N",
               help="continuous learning: stop after N rounds (0 = run until stopped)")


# The plain run's settings, measured on the built-in pairs (docs/sft.md "Defaults chosen by"). The seed's (Overseer,
# training/configs/training_config.py) standard column was made for fine-tuning a large pretrained model: lr 1e-4, batch
# 16 x 4, context 2048, one epoch (46 steps) left this small model, trained from scratch, at 0.0 % exact command
# accuracy (val loss 4.59). Here: lr 4e-3 (8e-3: 45 %, 2e-3: 22 % at 600 steps), 16 x 2 (16 x 1 for 1000 steps: 47 %),
# context 256 (99 % of the man-page pairs fit in 178 tokens), and 12 passes over the data, at least 1000 steps: 1000
# steps whatever the data scored 90.0 % on the built-in pairs (11 passes) but 0.0-1.6 % exact on 8,100 man-page pairs
# (4 passes) where 12 passes scored 26.0 % (TF-IDF retrieval 4.4 %; docs/sft.md). The seed's column: a command line.
SFT_EPOCHS = 12
# schedule and beta2 stay what the sft thresholds (tests/test_sft.py) were measured with
SFT_DEFAULT = dict(batch_size=16, grad_accum=2, lr=4e-3, seq_len=256, workers=0, pin_memory=True, max_steps=1000,
                   save_every=500, eval_every=250, log_every=10, ram_threshold=85.0, gpu_threshold=90.0,
                   swap_threshold=50.0, mem_check_every=30.0, schedule="onecycle", beta2=0.95)
# --quick: the shorter demo the tests and golden losses use (600 steps of 16 x 2)
SFT_QUICK = dict(batch_size=16, grad_accum=2, lr=4e-3, seq_len=256, workers=0, save_every=100, eval_every=100,
                 max_steps=600)
# The seed's three small-machine modes. The seed set its mode flag after the config object was built,
# so the overrides never took effect; here apply_modes runs before anything is built, and a test checks
# that each value reaches the running loop (args.json "loop"). --mac and --cpu-only are the seed's
# values outright; --resource-efficient only lowers: each length, size, cadence and threshold becomes
# the smaller of the chosen value and the table's, its micro-batch is halved with accumulation doubled
# (common.choose_batch_size: the same effective batch) and the lr is left alone.
MODES = {  # precedence: mac > cpu-only > resource-efficient (the seed's order); one mode applies
    "mac": dict(batch_size=1, grad_accum=32, lr=3e-5, seq_len=256, precision="fp32", workers=0, ram_threshold=60.0,
                gpu_threshold=70.0, swap_threshold=25.0, mem_check_every=10.0, save_every=100, eval_every=25),
    "cpu_only": dict(batch_size=1, grad_accum=64, lr=1e-5, seq_len=128, precision="fp32", device="cpu",
                     ram_threshold=50.0, gpu_threshold=0.0, swap_threshold=20.0, mem_check_every=5.0,
                     save_every=50, eval_every=10),
    "resource_efficient": dict(seq_len=1024, workers=1, pin_memory=False, grad_checkpointing=True, precision="fp16",
                               save_every=200, eval_every=50, log_every=25, ram_threshold=70.0, gpu_threshold=75.0,
                               swap_threshold=30.0, mem_check_every=15.0),
}
ONLY_LOWERS = ("resource_efficient",)
# what --help shows as the defaults: the plain run's (apply_modes layers them in, under config and flags)
parser.set_defaults(**{k: SFT_DEFAULT[k] for k in ("batch_size", "grad_accum", "lr", "save_every", "eval_every",
                                                   "schedule", "beta2")})


def apply_modes(args, sources, log):
    """Settings layers after optimal_config.json, before anything is built (common.resolve_settings calls this): the
    plain run's defaults, then --quick, then one mode; flags typed by the user always win."""
    def layer(values, name, over_config=()):
        for key, value in values.items():
            if key == "max_steps" and sources.get("epochs") == "flag":
                continue  # --epochs N typed: N passes, not the layer's step count
            if sources.get(key) in ("default", "sft default") or (
                    sources.get(key) == "optimal_config.json" and key in over_config):
                setattr(args, key, value)
                sources[key] = name

    # optimal_config.json's lm batch and seq_len are sized for pretraining windows, not for pairs
    layer(SFT_DEFAULT, "sft default", over_config=("batch_size", "grad_accum", "seq_len"))
    if args.quick:
        layer(SFT_QUICK, "quick", over_config=("batch_size", "grad_accum", "seq_len", "workers"))
    mode = next((m for m in MODES if getattr(args, m)), None)  # MODES is in precedence order
    if not mode:
        return
    given = [f"--{m.replace('_', '-')}" for m in MODES if getattr(args, m)]
    cuda = args.device != "cpu" and torch.cuda.is_available()
    rows = []
    for key, value in MODES[mode].items():
        before = getattr(args, key)
        note = ""
        if sources.get(key) == "flag":
            value, note = before, "kept: given as a flag"
        elif key == "precision" and value == "fp16" and not (cuda and mode != "mac"):
            value, note = before, "fp16 is for the GPU; the CPU stays fp32"
        elif mode in ONLY_LOWERS and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and isinstance(before, (int, float)) and before <= value:
            value, note = before, "kept: the mode only lowers"
        else:
            setattr(args, key, value)
            sources[key] = mode.replace("_", "-")
        rows.append((key.replace("_", "-"), before, value, note))
    if mode in ONLY_LOWERS:  # common.choose_batch_size halves it once the batch is known
        rows.append(("micro-batch", args.batch_size, "halved", "grad-accum doubled: the same effective batch"))
    eff = args.batch_size * args.grad_accum if "auto" not in (args.batch_size, args.grad_accum) else "auto"
    log(f"--{mode.replace('_', '-')}: the seed's settings, applied before anything is built"
        + (f" ({' > '.join(given)}: the first wins)" if len(given) > 1 else ""))
    log(f"  {'setting':<18} {'before':>9} -> {'after':<9}")
    for key, before, after, note in rows:
        log(f"  {key:<18} {str(before):>9} -> {str(after):<9} {note}")
    log(f"  {'effective batch':<18} {'':>9}    {eff}")


# -----------------------------------------------------------------------------
# pair files (--data, --download-data; URLs come through common.fetch_data)

PAIR_EXTS = (".jsonl", ".csv")
CSV_COLUMNS = ("description", "command", "explanation")  # explanation may be empty or absent


def read_pairs(path, flag, bad_rows="skip"):
    """Instruction pairs from one .jsonl ({"input", "output"}) or .csv (description, command,
    explanation) file, or from every such file in a folder (sorted), through records.py. Returns
    (records, bad, reasons): records are {"input", "output"} dicts, `bad` counts the rows skipped,
    `reasons` holds the first few ("line 7: no 'output'"); --bad-rows fail stops at the first one."""
    records = common.opt_in("records", flag)  # only for a user's file: the built-in pairs need none
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in PAIR_EXTS)
        if not files:
            raise UserError(f"{flag} {p}: no .jsonl or .csv files in this folder")
        pairs, bad, reasons = [], 0, []
        for f in files:
            r, b, why = read_pairs(f, flag, bad_rows)
            pairs += r
            bad += b
            reasons += [f"{f.name} {w}" for w in why][:records.MAX_REASONS - len(reasons)]
        return pairs, bad, reasons
    ext = p.suffix.lower()
    if ext not in PAIR_EXTS:
        raise UserError(f"{flag} {p}: unknown file type '{ext}'; use .jsonl (one {{\"input\", \"output\"}} "
                        f"object a line) or .csv ({','.join(CSV_COLUMNS)})")
    if ext == ".jsonl":
        return records.read_records(p, flag, ("input", "output"), bad_rows=bad_rows)
    rows, bad, reasons = records.read_records(p, flag, CSV_COLUMNS[:2], optional=CSV_COLUMNS[2:], bad_rows=bad_rows)
    return [{"input": r["description"], "output": format_answer(r["command"], r.get("explanation", ""))}
            for r in rows], bad, reasons


def sft_pairs(args, log):
    """The pairs to fine-tune on, split by split_of: (train, val, test) lists of {input, output}.
    --data (a .jsonl/.csv file or a folder of them, or an http(s) URL of one), else the built-in
    generator; pairs from --download-data are added. A request seen twice keeps its first answer."""
    given = {"data": args.data, "download_data": list(args.download_data or [])}  # as typed, for the log
    common.fetch_data(args, ("data", "download_data"), log, exts=PAIR_EXTS)
    if args.data:
        records, bad, reasons = read_pairs(Path(args.data).expanduser(), "--data", args.bad_rows)
        log(f"--data {args.data}: {len(records)} pairs" + (f", {bad} bad rows skipped (first: {reasons[0]})"
                                                            if bad else ""))
    else:
        records = builtin_pairs()
        if not DEFAULT_PAIRS.exists():  # a file to read and copy; never overwritten
            DEFAULT_PAIRS.parent.mkdir(parents=True, exist_ok=True)
            tmp = DEFAULT_PAIRS.with_name(DEFAULT_PAIRS.name + f".tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, DEFAULT_PAIRS)
        log(f"built-in data: {len(records)} English request -> shell command pairs (a copy to read or extend: "
            f"{DEFAULT_PAIRS}, use it with --data)")
    for url, path in zip(given["download_data"], args.download_data or []):
        recs, bad, reasons = read_pairs(path, "--download-data" if path == url else f"--download-data {url} ->",
                                        args.bad_rows)
        first = f" (first: {'; '.join(reasons)})" if reasons else ""
        if not recs:
            raise UserError(f"--download-data {url}: no usable input/output pairs, {bad} bad rows{first}")
        log(f"--download-data {url}: {len(recs):,} pairs, {bad} bad rows skipped{first}")
        records += recs
    pairs = {}
    for r in records:
        pairs.setdefault(r["input"], r)  # a request seen twice keeps its first answer
    test, val, train = [], [], []
    for p in pairs.values():
        (test, val, train)[min(split_of(p), 2)].append(p)  # 10 % test, 10 % val, 80 % train
    if not (train and val and test):
        raise UserError(f"{'--data ' + str(args.data) if args.data else 'the data'}: {len(pairs)} distinct pairs "
                        f"give {len(train)} train / {len(val)} val / {len(test)} test; each split needs at least "
                        "one (about 30 pairs or more)")
    return train, val, test


def init_shape(args, sources, log):
    """--init-from: the model's shape comes from that run's checkpoint; returns its state."""
    if not args.init_from:
        return None
    state, path = common.load_run_model(args.init_from, "--init-from", "lm", "model_cfg")
    for key in ("arch", "n_layer", "n_head", "d_model", "num_eigenstates", "chunk_size"):
        if sources.get(key) == "flag" and getattr(args, key) != state["model_cfg"][key]:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)}: the shape comes from --init-from "
                            f"({key} {state['model_cfg'][key]}); drop the flag")
        setattr(args, key, state["model_cfg"][key])
        sources[key] = "init-from"
    log(f"--init-from {path} (step {state['step']}, {state.get('task', 'lm')}): its weights and shape")
    return state


def load_init(model, init, log):
    """Copy --init-from weights into the fine-tuning model. The token table grows from the
    pretrained vocabulary (257 ids) by the 8 specials, and the position table may grow to the
    new --seq-len: the new rows keep their N(0, 0.02) init and are learned in fine-tuning."""
    own, grown = model.state_dict(), []
    for k, v in init["model"].items():
        if own[k].shape != v.shape:
            n = min(v.shape[0], own[k].shape[0])
            own[k][:n] = v[:n]
            grown.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
        else:
            own[k].copy_(v)
    model.load_state_dict(own)
    if grown:
        log("--init-from: " + "; ".join(dict.fromkeys(grown)))


# -----------------------------------------------------------------------------
# main: flags -> pairs -> run folder -> train

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["ask"], ["rate"]):
        return (run_ask if argv[0] == "ask" else run_rate)(argv[1:])
    notes = []
    args, sources = common.resolve_settings(parser, argv, log=notes.append, modes=apply_modes)
    init = init_shape(args, sources, notes.append)
    resolve_shape(args, sources, notes.append)
    check_flags(args)
    if not 0 <= args.replay < 1:
        raise UserError(f"--replay {args.replay}: must be in [0, 1) (the share of replayed pairs per batch)")
    if args.continuous_learning and not args.feedback_db:
        raise UserError("--continuous-learning: needs --feedback-db PATH (the SQLite store ask/rate write)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.continuous_learning:
        raise UserError("--continuous-learning: runs as one process (no torchrun)")
    # -- data, validated before the run folder is touched
    data = dict(zip(("train", "val", "test"), sft_pairs(args, notes.append)))
    cfg = model_config(args, SFT_VOCAB)
    if args.eval_only:
        return eval_only(args, sources, cfg, data, notes)
    if args.continuous_learning:
        open_feedback_db(args.feedback_db, create=True).close()  # a bad path or file fails now, not after training
    run = start(args, sources, notes, "sft", "val_loss", lambda state, path, world: check_resume(
        state, path, cfg, world, task="sft"))
    try:
        with common.recording_failures(run.out, run.status) if run.ranks.is_main else nullcontext():
            return train(args, sources, run, cfg, data, init)
    finally:
        run.ranks.end()


# -----------------------------------------------------------------------------
# train: pairs -> model -> fit the machine -> optimizer -> resume -> the loop -> report

def train(args, sources, run, cfg, data, init):
    out, log, status, device, ranks, state = run.out, run.log, run.status, run.device, run.ranks, run.state
    examples, val_examples, mean_len = render_splits(data, args.seq_len, log)

    # -- model: train_lm.py's, from scratch or from --init-from
    log_presets(cfg, log)
    model = LM(cfg).to(device)
    if init and not state:
        load_init(model, init, log)
    model.grad_checkpointing = args.grad_checkpointing
    n_params, _ = common.count_params(model)
    log(describe(args, cfg, n_params))

    # -- fit the machine: the micro-batch (a probe on the longest pair; effective batch per rank fixed),
    # the precision (on a CPU, bf16 only where this model's own step is measured faster in it)
    longest = pad_to(max(len(ids) for ids, _ in examples) - 1, args.seq_len)  # as collate pads its batch
    sft_loss = functools.partial(sft_loss_fn, device=device)
    worst = lambda bs: {"x": torch.zeros(bs, longest + 1, dtype=torch.long), "w": torch.ones(bs, longest)}
    micro_bs, accum, run.amp_dtype, why = common.fit_batch(
        model, sft_loss, worst, args, sources, device=device, amp_dtype=run.amp_dtype, prec_why=run.prec_why,
        state=state, log=log, ranks=ranks, unit="pairs")
    E, G = micro_bs * accum, micro_bs * accum * ranks.world  # pairs per rank per step, and the global batch
    tokens_per_step = G * mean_len  # on average (padding not counted)
    if len(examples) < G:
        raise UserError(f"--batch-size x --grad-accum = {G} pairs per step, but the data has {len(examples)} "
                        "training pairs; lower --grad-accum or add data")

    # -- optimizer and schedule (train_lm.py's; the sft defaults keep onecycle and beta2 0.95), the plan
    def steps_for(g):  # (steps an epoch, steps in the run) for a global batch of g pairs
        per_epoch = max(1, len(examples) // g)
        if sources["max_steps"] == "sft default":  # the plain run: SFT_EPOCHS passes, at least its 1000 steps
            return per_epoch, max(args.max_steps, SFT_EPOCHS * per_epoch)
        return per_epoch, args.max_steps or args.epochs * per_epoch
    steps_per_epoch, total_steps = steps_for(G)
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    optimizer, scheduler, line = make_optimizer(model, args, total_steps, device)
    log(f"{line}; {total_steps / steps_per_epoch:.1f} passes over the {len(examples):,} training pairs")
    plan = common.memory_plan(args, model, optimizer, sft_loss, worst(micro_bs), device=device, amp_dtype=run.amp_dtype,
                              world=ranks.world, log=log, worst=f"the longest pair, padded ({longest} tokens)")
    if args.plan:
        return common.plan_only(out, status, log)

    # -- resume, and args.json with what fitting the machine chose
    step, best = resume(run, args, sources, model, optimizer, scheduler, chosen={
        "micro_batch": micro_bs, "grad_accum": accum, "world_size": ranks.world, "effective_batch": E,
        "global_batch": G, "tokens_per_step": tokens_per_step, "precision": args.precision,
        "device": device.type, "why": why}, steps_for=steps_for)
    train_model, no_sync = ranks.wrap(torch.compile(model) if args.compile else model)  # `model` is what we save
    peak, peak_why = device_peak(device, run.amp_dtype, args.config, out) if ranks.is_main else (1.0, "")
    fpt = flops_per_token(dict(cfg, seq_len=max(1, round(mean_len))))  # attention at the average pair length
    log(f"MFU against {peak_why}; model FLOPs {fpt / 1e6:.2f} M per token, {tokens_per_step:,.0f} tokens per step")
    tb = common.tensorboard(args, out) if ranks.is_main else None
    eval_bs = micro_bs  # halved for good if a validation batch runs out of memory
    loader = step_loader(sft_batch, args, device, steps=range(step, max(step, total_steps)), examples=examples,
                         seed=args.seed, global_batch=G, rank=ranks.rank, per_rank=E, seq_len=args.seq_len)

    # -- the loop
    watch = common.memory_watch(args)
    if ranks.is_main:
        common.update_status(out, status, state="running", total_steps=total_steps, step=step)
        record_loop(args, sources, out, model, optimizer, loader, watch, micro_bs=micro_bs, accum=accum)
    t_start, samples_seen, start_step = time.time(), 0, step
    t_log, step_log, tokens_log = time.time(), step, 0
    bar = common.progress_bar(total_steps, step) if ranks.is_main else None
    model.train()
    batch_iter = iter(loader)
    while step < total_steps:
        batch = next(batch_iter)
        tokens_log += int(batch["n"].sum()) * ranks.world
        # under torchrun each rank divides by the global batch's answer tokens / world: DDP's average is exact
        n_global = answer_tokens(step, examples, args.seed, G, args.seq_len) if ranks.world > 1 else None
        with plan.measure(batch["x"].numel()):  # a step with the largest batch yet
            loss, n, micro_bs = common.train_step(train_model, optimizer, run.scaler, batch, sft_loss, micro_bs,
                                                  clip=args.clip, device=device, amp_dtype=run.amp_dtype, log=log,
                                                  no_sync=no_sync,
                                                  norm=n_global / ranks.world if ranks.world > 1 else None)
        accum = math.ceil(E / micro_bs)
        scheduler.step()
        step, samples_seen = step + 1, samples_seen + G
        common.check_memory(watch, device, log)
        if bar is not None:
            bar.update(1)
        if step % args.log_every == 0 or step == total_steps:
            if ranks.world > 1:  # the global batch's loss per answer token
                loss = ranks.all(loss * n, "sum") / n_global
            elapsed, steps, tokens = time.time() - t_log, step - step_log, tokens_log
            t_log, step_log, tokens_log = time.time(), step, 0
            if ranks.is_main:
                peak = log_interval(run, bar, tb, step=step, total=total_steps, loss=loss,
                                    lr=scheduler.get_last_lr()[0], elapsed=elapsed, steps=steps, tokens=tokens,
                                    flops=(fpt, peak), epoch=step // steps_per_epoch + 1,
                                    since=(start_step, t_start), global_batch=G)
        is_best = False
        if args.eval_every and step % args.eval_every == 0 or step == total_steps:
            if ranks.is_main:  # never a bigger batch than training's
                val_loss, eval_bs = validate(run, tb, model, val_examples, args, step=step, bs=min(eval_bs, micro_bs))
                is_best, best = val_loss < best, min(best, val_loss)
            is_best = bool(ranks.all(is_best, "max"))  # every rank must know whether a checkpoint follows
        why = common.stop_requested(run.stop, out)
        stop = ranks.all(bool(why), "max")  # every rank stops at the same step
        if step % args.save_every == 0 or is_best or step == total_steps or stop:
            if ranks.is_main:
                save(run, args, model, optimizer, scheduler, task="sft", cfg=cfg, step=step, best=best,
                     micro_bs=micro_bs, accum=accum, t_start=t_start, samples=samples_seen, best_now=is_best)
            ranks.barrier()  # no rank runs ahead of a checkpoint being written
        if stop:
            return stopped(run, bar, tb, step, why)
    del batch_iter  # its worker processes end here
    if bar is not None:
        bar.close()
    ranks.barrier()
    if not ranks.is_main:
        return 0
    report(args, run, model, data, val_examples, min(eval_bs, micro_bs), cfg, best=best, step=step,
           start_step=start_step, t_start=t_start, samples=samples_seen, mean_len=mean_len, fpt=fpt, peak=peak,
           n_params=n_params, global_batch=G, memory=plan.figures(run.log))
    if args.continuous_learning:  # a kept round saves a new checkpoint, and best.pt (what ask serves), at its step
        save_round = functools.partial(save, run, args, model, optimizer, scheduler, task="sft", cfg=cfg, best=best,
                                       micro_bs=micro_bs, accum=accum, t_start=t_start, samples=samples_seen,
                                       best_now=True)
        feedback_rounds(args, run, tb, model, micro_bs, E, examples, data["test"], step=step, save_round=save_round)
    if tb:
        tb.close()
    return 0


def render_splits(data, seq_len, log):
    """The pairs as (ids, n_prompt) examples: (train, val, mean train length in tokens)."""
    examples = [render(p) for p in data["train"]]
    val_examples = [render(p) for p in data["val"]]
    mean_len = sum(len(ids) - 1 for ids, _ in examples) / len(examples)
    cut = sum(len(ids) > seq_len + 1 for ids, _ in examples)
    log(f"data: {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test pairs, "
        f"{mean_len:.0f} tokens on average" + (f"; {cut} longer than --seq-len {seq_len} are cut" if cut else "")
        + f"; bytes + {len(SFT_SPECIALS)} special tokens, vocab {SFT_VOCAB}; loss on the answer only")
    return examples, val_examples, mean_len


def record_loop(args, sources, out, model, optimizer, loader, watch, *, micro_bs, accum):
    """args.json's chosen.loop: what the loop really runs with, read back from its objects (the
    mode tables are tested on this, so a mode's value that never reached the loop shows)."""
    common.write_args(out, args, sources, dict(json.loads((out / "args.json").read_text())["chosen"], loop={
        "micro_batch": micro_bs, "grad_accum": accum, "lr": optimizer.param_groups[0]["initial_lr"],
        "seq_len": model.cfg["seq_len"], "workers": loader.num_workers, "pin_memory": loader.pin_memory,
        "grad_checkpointing": model.grad_checkpointing, "precision": args.precision, "device": str(
            next(model.parameters()).device.type), "save_every": args.save_every, "eval_every": args.eval_every,
        "log_every": args.log_every, "ram_threshold": watch["ram"], "gpu_threshold": watch["gpu"],
        "swap_threshold": watch["swap"], "mem_check_every": watch["every"]}))


@torch.inference_mode()
def evaluate_sft(model, examples, device, amp_dtype, bs, seq_len):
    """Validation loss in nats per answer token (prompts masked, as in training)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), bs):
        with common.autocast(device, amp_dtype):
            loss, k = sft_loss_fn(model, collate(examples[i:i + bs], seq_len), device)
        total, n = total + loss.item(), n + int(k)
    model.train()
    return total / max(1, n)


def command_accuracy(model, pairs, device, max_new=64):
    """(exact, substring, answers) on pairs: exact = the generated command (between <command>
    and </command>) equals the expected one, whitespace-normalised; substring = the expected
    command appears in the generated text (the seed's "command accuracy")."""
    answers = [decode_sft(ids) for ids in greedy_batch(model, [prompt_ids(p["input"]) for p in pairs],
                                                        max_new, device, stop=CMD_CLOSE)]
    want = [command_of(p["output"]) for p in pairs]
    exact = sum(command_of(a) == w for a, w in zip(answers, want)) / max(1, len(pairs))
    sub = sum(w in " ".join(a.split()) for a, w in zip(answers, want)) / max(1, len(pairs))
    return exact, sub, answers


def validate(run, tb, model, val_examples, args, *, step, bs):
    """The validation at `step` (rank 0; bs pairs a batch, halved if another process took the memory since training
    fitted it): its metrics.jsonl record, log line, status.json and TensorBoard -> (val loss, the bs that fitted)."""
    val_loss, bs = common.evaluate_halving(lambda b: evaluate_sft(model, val_examples, run.device, run.amp_dtype, b,
                                                                  args.seq_len), bs, run.device, run.log)
    common.append_metrics(run.out, {"step": step, "val_loss": round(val_loss, 6)}, tb)
    run.log(f"step {step}: val loss {val_loss:.4f} nats per answer token ({len(val_examples)} pairs)")
    common.update_status(run.out, run.status, metric=round(val_loss, 5))
    return val_loss, bs

def report(args, run, model, data, val_examples, eval_bs, cfg, *, best, step, start_step, t_start, samples,
           mean_len, fpt, peak, n_params, global_batch, memory):
    """The end of a run: val loss (at eval_bs, the evaluation batch that fitted), command accuracy on
    the test split, summary.json."""
    out, log, status, device = run.out, run.log, run.status, run.device
    if step == start_step and (out / "summary.json").exists():
        return common.finished_before(out, status, step, log)
    wall, train_s, samples = totals(run, t_start, samples)
    val_loss, _ = common.evaluate_halving(
        lambda bs: evaluate_sft(model, val_examples, device, run.amp_dtype, bs, args.seq_len), eval_bs, device, log)
    log(f"scoring the {len(data['test'])} test pairs: greedy decoding of every answer (about a minute on a CPU)")
    t0 = time.time()
    exact, sub, answers = command_accuracy(model, data["test"], device)
    log(f"test decoding took {time.time() - t0:.0f}s")
    tps = samples * mean_len / max(1e-9, train_s)
    common.write_json_atomic(out / "summary.json", dict(
        trainer="sft", task="sft", metric="val_loss", value=round(val_loss, 6), best_value=round(best, 6),
        command_exact=round(exact, 4), command_substring=round(sub, 4), test_pairs=len(data["test"]), steps=step,
        tokens_per_s=round(tps, 1), samples_per_s=round(samples / max(1e-9, train_s), 2),
        mfu=round(fpt * tps / peak, 4), params=n_params, trainable_params=n_params, wall_s=round(wall, 1),
        arch=cfg["arch"], seq_len=args.seq_len, device=device.type, precision=args.precision,
        effective_batch=global_batch // run.ranks.world, global_batch=global_batch, pairs_trained=samples,
        world_size=run.ranks.world, **memory))
    log(f"done: test command accuracy {exact:.1%} exact, {sub:.1%} substring ({len(data['test'])} pairs); val loss "
        f"{val_loss:.4f} nats per answer token after {step} steps, {samples:,} pairs, in {wall:.0f}s; "
        f"summary {out / 'summary.json'}")
    for p, a in list(zip(data["test"], answers))[:5]:
        log(f"  {p['input']!r} -> {command_of(a)!r}" + ("" if command_of(a) == command_of(p["output"]) else
                                                     f" (expected {command_of(p['output'])!r})"))
    log(f"ask it: python train_sft.py ask --out {out} \"list files by size\"")
    common.update_status(out, status, state="finished", step=step, metric=round(val_loss, 6), eta_s=0,
                         command_exact=round(exact, 4))


# -----------------------------------------------------------------------------
# continuous learning: fine-tune on rated answers from the feedback store (SQLite), after training

def feedback_rounds(args, run, tb, model, micro_bs, E, examples, test_pairs, *, step, save_round):
    """--continuous-learning: watch --feedback-db; at --retrain-threshold new well-rated rows, fine-tune on them with
    --replay of the original pairs, keep the result only if the test split's exact command accuracy is not worse,
    record the rows as used (metrics.jsonl and TensorBoard get the round's record), and watch again. Each round
    starts a fresh AdamW at a tenth of --lr, constant: the main run's schedule has ended at zero, and a small step
    keeps the round from undoing what the model knew."""
    out, log, status, stop, device, amp_dtype = run.out, run.log, run.status, run.stop, run.device, run.amp_dtype
    db, run_key, warned = args.feedback_db, str(Path(out).resolve()), set()
    round_no, rounds_here = max(used_rows(db, run=run_key).values(), default=0), 0
    exact, sub, _ = command_accuracy(model, test_pairs, device)
    log(f"continuous learning: watching {db} every {args.poll_every:g}s; a round starts at "
        f"{args.retrain_threshold} new rows rated feedback >= 1 and success = 1; test exact {exact:.1%} now")
    common.update_status(out, status, state="watching", round=round_no, command_exact=round(exact, 4))
    while True:
        if why := common.stop_requested(stop, out):
            log(f"continuous learning stopped by {why} after round {round_no}; re-run the same command to go on")
            common.update_status(out, status, state="stopped")
            return 0
        rows = new_training_rows(db, warned, log)
        if len(rows) < args.retrain_threshold:
            t_next = time.time() + args.poll_every
            while time.time() < t_next and not common.stop_requested(stop, out):
                time.sleep(min(0.2, args.poll_every))
            continue
        round_no, rounds_here = round_no + 1, rounds_here + 1
        # a logged answer in the model's own form, or a bare command (another tool's row) wrapped
        new = [render({"input": r["input"], "output": r["output"] if "<command>" in r["output"] else
                       format_answer(r["output"].strip())}) for r in rows]
        n_new = max(1, round(E * (1 - args.replay)))  # per step; the rest of the batch is replay
        n_steps = math.ceil(args.round_epochs * len(new) / n_new)
        log(f"round {round_no}: {len(rows)} new rows (ids {rows[0]['id']}..{rows[-1]['id']}), {n_steps} steps of "
            f"{n_new} new + {E - n_new} replayed pairs")
        common.update_status(out, status, state="retraining", round=round_no)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}  # to roll back a worse round
        optimizer = common.make_optimizer(model.parameters(), args, lr=args.lr / 10, betas=(0.9, args.beta2),
                                          weight_decay=args.weight_decay)
        rng = np.random.default_rng((args.seed, 1_000_000 + round_no))
        order = np.concatenate([rng.permutation(len(new)) for _ in range(args.round_epochs + 1)])
        model.train()
        halted = None
        for i in range(n_steps):
            batch = [new[j] for j in order[i * n_new:(i + 1) * n_new]]
            batch += [examples[j] for j in rng.integers(0, len(examples), E - n_new)]
            loss, _, micro_bs = common.train_step(model, optimizer, run.scaler, collate(batch, args.seq_len),
                                                  lambda m, b: sft_loss_fn(m, b, device), micro_bs, clip=args.clip,
                                                  device=device, amp_dtype=amp_dtype, log=log)
            if halted := common.stop_requested(stop, out):
                break
        if halted:  # a half round is thrown away; its rows stay new for the next run
            model.load_state_dict(before)
            log(f"round {round_no} interrupted by {halted}: discarded, its rows stay unused")
            common.update_status(out, status, state="stopped")
            return 0
        after, after_sub, _ = command_accuracy(model, test_pairs, device)
        kept = after >= exact
        if kept:
            step += n_steps
            save_round(step=step)
        else:
            model.load_state_dict(before)
        mark_used(db, [r["id"] for r in rows], round_no, run_key, kept)
        rec = {"round": round_no, "step": step, "rows": len(rows), "first_id": rows[0]["id"], "last_id": rows[-1]["id"],
               "round_steps": n_steps, "loss": round(loss, 6), "test_exact_before": round(exact, 4),
               "test_exact_after": round(after, 4), "test_substring_after": round(after_sub, 4), "kept": kept}
        common.append_metrics(out, rec, tb)
        log(f"round {round_no}: test exact {exact:.1%} -> {after:.1%}: "
            + (f"kept (checkpoint step {step})" if kept else "worse, rolled back"))
        exact = after if kept else exact
        common.update_status(out, status, state="watching", step=step, round=round_no, last_round=rec,
                             command_exact=round(exact, 4))
        if args.max_rounds and rounds_here >= args.max_rounds:
            log(f"--max-rounds {args.max_rounds}: done")
            common.update_status(out, status, state="finished")
            return 0


# The feedback store (SQLite): `ask --feedback-db PATH` logs each request and answer, `rate` records
# whether the answer was good, and the --continuous-learning watcher polls for rated rows it has not
# trained on yet. Three processes share one file, so every function opens its own short-lived
# connection and holds a transaction only for one statement or one small batch.

# the seed's table, column for column (context: JSON text; success: 0/1), so a database the seed wrote opens
FEEDBACK_SCHEMA = ("CREATE TABLE IF NOT EXISTS user_interactions (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "timestamp TEXT, user_input TEXT, ai_response TEXT, user_feedback INTEGER, context TEXT, "
                   "success INTEGER);")
# ours: one row per interaction a retraining round consumed, so no row is trained on twice
TRAINING_USE_SCHEMA = ("CREATE TABLE IF NOT EXISTS training_use (interaction_id INTEGER PRIMARY KEY, round INTEGER, "
                       "run TEXT, kept INTEGER, used_at TEXT);")
SEED_COLUMNS = ("id", "timestamp", "user_input", "ai_response", "user_feedback", "context", "success")
BUSY_S = 10.0  # how long one feedback-db call waits for another process's lock before it fails
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 database file


def open_feedback_db(path, create=True):
    """Open (and with create=True make) the feedback database; every problem is a UserError naming
    --feedback-db. create=False is for readers (`rate`, the trainer): a missing file is then the
    user's mistake, not a reason to leave an empty database behind."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--feedback-db {path}: is a folder; give a file name such as {path / 'feedback.db'}")
    if not path.exists():
        if not create:
            raise UserError(f"--feedback-db {path}: no such database; `ask --feedback-db {path}` creates it")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.stat().st_size:
        # check the header ourselves: sqlite3 only notices at the first query, and switching the
        # journal mode of a file that is not a database must never be tried
        with open(path, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                raise UserError(f"--feedback-db {path}: not a SQLite database; give another file name")
    try:
        # timeout = the busy timeout, set by connect before any statement runs: a statement that meets
        # another connection's lock waits up to BUSY_S instead of failing with "database is locked";
        # isolation_level=None: we say BEGIN ourselves
        con = sqlite3.connect(str(path), timeout=BUSY_S, isolation_level=None)
    except sqlite3.Error as e:
        raise UserError(f"--feedback-db {path}: cannot open ({e})") from None
    try:
        set_wal(con)
        # in WAL mode NORMAL survives a crash of any process; only a power cut can lose the last commits
        con.execute("PRAGMA synchronous=NORMAL")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "user_interactions" in tables:
            cols = {r[1] for r in con.execute("PRAGMA table_info(user_interactions)")}
            if missing := [c for c in SEED_COLUMNS if c not in cols]:
                raise UserError(f"--feedback-db {path}: its user_interactions table lacks column(s) "
                                f"{', '.join(missing)}; it was not written by `ask` or the seed")
        elif tables and not create:
            # another program's database (one with no table at all is one `ask` is creating right now)
            raise UserError(f"--feedback-db {path}: has no user_interactions table; is it the right file?")
        if not {"user_interactions", "training_use"} <= tables:
            # every opener, readers too, so one that races the creator finds the tables, not an error;
            # IF NOT EXISTS inside one write transaction: two creators at once make them once.
            # training_use is also added to a seed database opened read-side: the trainer records
            # what it used there
            con.executescript(f"BEGIN IMMEDIATE; {FEEDBACK_SCHEMA} {TRAINING_USE_SCHEMA} COMMIT;")
    except UserError:
        con.close()
        raise
    except sqlite3.Error as e:
        con.close()
        raise UserError(f"--feedback-db {path}: {e}") from None
    return con


def set_wal(con):
    """Switch to WAL: readers never block the writer nor the writer readers, so `ask`/`rate` can write while the trainer
    reads. The mode is stored in the file, so it is switched once, by whichever opener comes first. The switch needs
    a moment's exclusive lock, and SQLite answers "database is locked" to it at once, busy timeout or not, while
    another connection opens the same fresh file: retry for up to BUSY_S."""
    deadline = time.monotonic() + BUSY_S
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _feedback_call(db_path, create, fn, write=False):
    """fn(con) on a fresh connection, closed after; SQLite errors become one-line UserErrors. A write
    runs inside BEGIN IMMEDIATE ... COMMIT: the write lock is taken up front, where the busy timeout
    covers it, and the row is committed before the connection closes, or rolled back."""
    con = open_feedback_db(db_path, create=create)
    try:
        if not write:
            return fn(con)
        con.execute("BEGIN IMMEDIATE")
        try:
            result = fn(con)
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        return result
    except sqlite3.Error as e:
        raise UserError(f"--feedback-db {db_path}: {e}") from None
    finally:
        con.close()


def log_interaction(db_path, user_input, ai_response, context=None, success=None, feedback=None):
    """Append one request/answer pair (`ask --feedback-db`); returns its id. context is any
    JSON-serialisable value (stored as JSON text); success None = not known yet."""
    row = (datetime.now(timezone.utc).isoformat(timespec="seconds"), user_input, ai_response, feedback,
           None if context is None else json.dumps(context), None if success is None else int(bool(success)))
    return _feedback_call(db_path, True, lambda con: con.execute(
        "INSERT INTO user_interactions (timestamp, user_input, ai_response, user_feedback, context, success) "
        "VALUES (?, ?, ?, ?, ?, ?)", row).lastrowid, write=True)


def rate_interaction(db_path, interaction_id, feedback, success=None):
    """Set an interaction's user_feedback (any int: -1 bad, 0 neutral, 1 good, more = better) and, unless
    success is None, its success (1/0). An unknown id is a UserError."""
    if isinstance(feedback, bool) or not isinstance(feedback, int):
        raise UserError(f"feedback {feedback!r}: must be an integer (-1 bad, 0 neutral, 1 good)")

    def update(con):
        # COALESCE: success None leaves the stored value as it was
        cur = con.execute("UPDATE user_interactions SET user_feedback = ?, success = COALESCE(?, success) "
                          "WHERE id = ?", (feedback, None if success is None else int(bool(success)), interaction_id))
        if cur.rowcount == 0:
            raise UserError(f"--feedback-db {db_path}: no interaction {interaction_id}; "
                            f"`train_sft.py rate --feedback-db {db_path} --list` shows the ids")
    _feedback_call(db_path, False, update, write=True)


def _bad_row_reason(user_input, ai_response, feedback, context):
    """Why a rated row cannot be trained on, or None. The seed's table has no constraints, so anything
    another tool (or a hand edit) put there reaches this point."""
    for name, v in (("user_input", user_input), ("ai_response", ai_response)):
        if v is None:
            return f"{name} is NULL"
        if not isinstance(v, str):
            return f"{name} is a {type(v).__name__}, not text"
        if not v.strip():
            return f"empty {name}"
    # SQLite compares text as greater than any number, so user_feedback 'great' passes `>= 1`
    if isinstance(feedback, bool) or not isinstance(feedback, int):
        return f"user_feedback {feedback!r} is not an integer"
    if context is not None:
        if not isinstance(context, str):
            return f"context is a {type(context).__name__}, not JSON text"
        try:
            json.loads(context)
        except ValueError:
            return "context is not valid JSON"
    return None


def new_training_rows(db_path, warned, log):
    """Rated-good rows not yet trained on, oldest first: [{"id", "input", "output", "context"}] with
    context parsed from JSON (or None): what the --continuous-learning watcher polls for. A row
    needs user_feedback >= 1 and success = 1 and no training_use entry. A row that fails validation
    is skipped, never used, and logged once per id: `warned` is a set the caller keeps between
    polls. One SELECT = one short read transaction; in WAL mode it never blocks `ask`/`rate`."""
    def select(con):
        return con.execute(
            "SELECT u.id, u.user_input, u.ai_response, u.user_feedback, u.context FROM user_interactions u "
            "LEFT JOIN training_use t ON t.interaction_id = u.id "
            "WHERE t.interaction_id IS NULL AND u.user_feedback >= 1 AND u.success = 1 ORDER BY u.id").fetchall()
    rows = []
    for id_, user_input, ai_response, feedback, context in _feedback_call(db_path, False, select):
        if reason := _bad_row_reason(user_input, ai_response, feedback, context):
            if id_ not in warned:
                warned.add(id_)
                log(f"feedback-db: interaction {id_} skipped: {reason}")
            continue
        rows.append({"id": id_, "input": user_input, "output": ai_response,
                     "context": None if context is None else json.loads(context)})
    return rows


def mark_used(db_path, ids, round_no, run, kept):
    """Record that retraining round `round_no` of run folder `run` consumed these interaction ids, and whether its model
    was kept: after every round, whatever its outcome, so a row that made a round worse is not fed in again."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    batch = [(int(i), int(round_no), str(run), int(bool(kept)), now) for i in ids]
    # OR IGNORE: an id already recorded keeps its first round (a repeated call is harmless)
    _feedback_call(db_path, False, lambda con: con.executemany(
        "INSERT OR IGNORE INTO training_use (interaction_id, round, run, kept, used_at) VALUES (?, ?, ?, ?, ?)",
        batch), write=True)


def used_rows(db_path, run=None):
    """{interaction id: training round} for every row a round consumed (only run `run`'s, if given)."""
    where, params = ("", ()) if run is None else (" WHERE run = ?", (str(run),))
    return dict(_feedback_call(db_path, False, lambda con: con.execute(
        "SELECT interaction_id, round FROM training_use" + where, params).fetchall()))


# -----------------------------------------------------------------------------
# serve: --eval-only scores a saved model, ask turns requests into commands, rate records the
# user's verdict on an answer ask logged

def eval_only(args, sources, cfg, data, notes):
    """--eval-only: the report's figures for a saved model (train_lm.eval_model: best.pt or
    --resume CKPT), val loss on the val pairs and command accuracy on the test pairs of this
    command's data (the split is a hash of each request: the same as in training), printed and
    written to <out>/eval.json. No checkpoint, status.json, metrics.jsonl or train.log is touched."""
    for note in notes:
        print(note)
    out, model, state, path, device, amp_dtype, bs = eval_model(args, sources, cfg, "sft")
    val_examples = [render(p) for p in data["val"]]
    val_loss, _ = common.evaluate_halving(
        lambda b: evaluate_sft(model, val_examples, device, amp_dtype, b, args.seq_len), bs, device, print)
    print(f"scoring the {len(data['test'])} test pairs: greedy decoding of every answer (about a minute on a CPU)")
    exact, sub, answers = command_accuracy(model, data["test"], device)
    common.write_json_atomic(out / "eval.json", {
        "trainer": "sft", "task": "sft", "metric": "val_loss", "value": round(val_loss, 6),
        "val_loss": round(val_loss, 6), "val_pairs": len(data["val"]), "command_exact": round(exact, 4),
        "command_substring": round(sub, 4), "test_pairs": len(data["test"]), "checkpoint": str(Path(path).resolve()),
        "step": state["step"], "device": device.type, "precision": args.precision, "batch": bs})
    print(f"eval: test command accuracy {exact:.1%} exact, {sub:.1%} substring ({len(data['test'])} pairs); val loss "
          f"{val_loss:.4f} nats per answer token ({len(data['val'])} pairs), model {path} (step {state['step']}); "
          f"{out / 'eval.json'}")
    for p, a in list(zip(data["test"], answers))[:5]:
        print(f"  {p['input']!r} -> {command_of(a)!r}" + ("" if command_of(a) == command_of(p["output"]) else
                                                       f" (expected {command_of(p['output'])!r})"))
    return 0


def ask_parser():
    p = common.Parser(prog="train_sft.py ask", allow_abbrev=False, formatter_class=common.HelpFormat,
                      description="turn plain-English requests into shell commands with a train_sft.py run "
                                  "(its best checkpoint, else its newest)")
    p.add_argument("request", nargs="+",
                   help="what you want to do, e.g. \"list files by size\" (several: one answer each)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder of train_sft.py")
    p.add_argument("--feedback-db", default=None, metavar="PATH",
                   help="also log each request and answer in this SQLite store, to rate and learn from")
    p.add_argument("--max-new-tokens", type=common.pos_int, default=160, metavar="N", help="answer length limit")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    return p


def run_ask(argv):
    args = ask_parser().parse_args(argv)
    model, state, path, device = load_model(args, "sft")
    if state.get("task") != "sft":
        raise UserError(f"--out {args.out}: {path} is a language model (train_lm.py); ask needs a fine-tuned run: "
                        f"python train_sft.py --quick --out {args.out}-sft")
    answers = greedy_batch(model, [prompt_ids(r) for r in args.request], args.max_new_tokens, device)
    for request, ids in zip(args.request, answers):
        text = decode_sft(ids)
        explanation = text.split("</command>", 1)[1].strip() if "</command>" in text else ""
        print(f"> {request}\n$ {command_of(text)}" + (f"\n  {explanation}" if explanation else "") + (
            "" if command_of(text) else f"(no command: the model of step {state['step']} answers nothing yet; train "
            "it longer, e.g. re-run its command with a larger --max-steps)"))
        if args.feedback_db:
            i = log_interaction(args.feedback_db, request, text,
                                context={"run": str(Path(args.out).resolve()), "step": state["step"]})
            print(f"  logged as interaction {i}; rate it: python train_sft.py rate --feedback-db {args.feedback_db} "
                  f"{i} good   (or bad)")
    return 0


def rating_arg(s):
    """`rate`'s RATING: good, bad or an integer score."""
    if s in ("good", "bad"):
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be good, bad or an integer score, got {s!r}") from None


def rate_parser():
    p = common.Parser(prog="train_sft.py rate", allow_abbrev=False, formatter_class=common.HelpFormat,
                      usage="train_sft.py rate --feedback-db PATH ID {good,bad,SCORE} [--success | --failed]\n"
                            "       train_sft.py rate --feedback-db PATH --list [N]",
                      description="rate an answer that `ask --feedback-db` logged; --continuous-learning "
                                  "trains on answers with feedback >= 1 that succeeded")
    p.add_argument("--feedback-db", required=True, metavar="PATH", help="the database `ask --feedback-db` writes")
    p.add_argument("id", nargs="?", type=common.pos_int, metavar="ID", help="interaction id (see --list)")
    p.add_argument("rating", nargs="?", type=rating_arg, metavar="{good,bad,SCORE}",
                   help="good = feedback 1 + success 1; bad = feedback -1 + success 0; an integer sets "
                        "the feedback only")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--success", dest="success", action="store_const", const=True, default=None,
                   help="the command worked (overrides what good/bad imply)")
    g.add_argument("--failed", dest="success", action="store_const", const=False,
                   help="the command failed (overrides what good/bad imply)")
    p.add_argument("--list", nargs="?", type=common.pos_int, const=20, default=None, metavar="N",
                   help="show the last N interactions (default N 20) instead of rating one")
    return p


def _short(text, n):
    text = "NULL" if text is None else str(text).replace("\n", "\\n")
    return text if len(text) <= n else text[:n - 3] + "..."


def run_rate(argv):
    """`python train_sft.py rate ...`: record a rating, or list recent interactions."""
    p = rate_parser()
    args = p.parse_args(argv)
    db = args.feedback_db
    if args.list is not None:
        if args.id is not None or args.success is not None:
            p.error("--list takes no ID, RATING, --success or --failed")
        rows = _feedback_call(db, False, lambda con: con.execute(
            "SELECT id, timestamp, user_feedback, success, user_input, ai_response FROM user_interactions "
            "ORDER BY id DESC LIMIT ?", (args.list,)).fetchall())
        if not rows:
            print(f"--feedback-db {db}: no interactions yet")
            return 0
        used = used_rows(db)
        print(f"{'id':>6}  {'time (UTC)':<25} {'feedback':>8} {'success':>7}  {'training':<9} input -> response")
        for id_, ts, fb, ok, q, a in reversed(rows):
            train = f"round {used[id_]}" if id_ in used else "new"
            print(f"{id_:>6}  {_short(ts, 25):<25} {_short('-' if fb is None else fb, 8):>8} "
                  f"{'-' if ok is None else ok:>7}  {train:<9} {_short(q, 40)} -> {_short(a, 60)}")
        return 0
    if args.id is None or args.rating is None:
        p.error("give ID and RATING (good, bad or an integer), or --list")
    feedback, success = {"good": (1, True), "bad": (-1, False)}.get(args.rating, (args.rating, None))
    if args.success is not None:
        success = args.success
    rate_interaction(db, args.id, feedback, success)
    fb, ok = _feedback_call(db, False, lambda con: con.execute(
        "SELECT user_feedback, success FROM user_interactions WHERE id = ?", (args.id,)).fetchone())
    used = used_rows(db)
    if args.id in used:
        note = f"already trained on in round {used[args.id]}; the new rating does not undo that"
    elif fb < 1:
        note = "not trained on (that needs feedback 1 or more)"
    elif ok != 1:
        note = "not trained on until it is marked a success (add --success if the command worked)"
    else:
        note = "the next --continuous-learning round will train on it"
    print(f"interaction {args.id}: feedback {fb}, success {'unset' if ok is None else ok} -- {note}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
