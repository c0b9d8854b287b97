"""bench_asr.py -- the seed's model-size table for train_asr.py, measured here in one run.

For each preset (original d256 12+6, optimized d192 8+4, minimal d128 6+3), each batch size and
with and without the x4 time subsampling in front of the encoder: parameters, step time and
peak memory of one training step (forward, backward, AdamW) on 10-second utterances, with the
trainer's own model, loss and step (common.train_step). Prints a markdown table for the README.

    python benchmarks/bench_asr.py                                   # CPU, ~10 min on 2 cores
    python benchmarks/bench_asr.py --presets minimal --batch-sizes 2 --steps 1   # a quick look
    python benchmarks/bench_asr.py --device cuda                     # GPU: adds peak GPU memory
    python benchmarks/bench_asr.py --precision compare               # fp32 vs bf16: ~20 min on 2 idle cores (est.)
    python benchmarks/bench_asr.py --precision compare --presets minimal --batch-sizes 2 --steps 1   # 25 s, 2 shared cores

--precision compare measures every configuration in fp32 and in bf16 autocast (fresh workers,
alternating) and prints utterances/s, bf16 / fp32 and the loss of the last timed step of each
(random input: the loss only shows that bf16 computes the same step). The CER of each precision
comes from real training: --accuracy DIR --precision compare trains train_asr.py --preset minimal
with --precision fp32 and with --precision bf16 on DIR's manifests (no BiGRU) and prints the
trainer's own samples/s and test CER for both (its evaluation runs under the same autocast):

    python benchmarks/bench_asr.py --accuracy data/espeak --precision compare   # ~30 min (est.)

Each configuration runs in a fresh subprocess (this script re-invoked with --worker), so peak
memory is that configuration's alone. The input is random features of the right shape: the cost
of a step does not depend on what the audio says.

Accuracy on real speech (--accuracy DIR, a set written by make_speech_data.py): train_asr.py's
minimal preset with its defaults against the practitioner's baseline, a 2-layer BiGRU-CTC
(2.1M parameters) on the same log-mel features, for equal CPU time:

    python benchmarks/make_speech_data.py data/espeak                # once, ~1 min
    python benchmarks/bench_asr.py --accuracy data/espeak            # ~15 + 15 min on 2 idle cores
    python benchmarks/bench_asr.py --accuracy data/espeak --ours-flags "--lr 5e-4 --epochs 10"  # the seed's

Ours is the real script in a subprocess (`train_asr.py --preset minimal` + the three manifests +
--out, nothing else). Then the BiGRU trains in a fresh process for the same CPU time (its start-up
and data reading included), with the same --threads, and reports the test CER of its best epoch
by validation CER. The budget is CPU time, not wall time, so other jobs on the machine do not
tilt the comparison; at one thread it is the wall time on an idle core. Test = voices never
heard in training. --ours-run RUN reads a finished run folder of that command instead of
training ours (then --budget-s, or else its summary's wall time, sets the BiGRU's budget), and
--bigru-out FILE a BiGRU worker's saved output that ran at least that long (every epoch that
improved its val CER recorded its test CER, so a long run answers for any shorter budget).

Where a run errs (--errors RUN, a finished train_asr.py run on manifests): its val and test CER
split by words the model heard 3+ times in training, 1-2 times, or never (decoded again with
best.pt, beam search as in its report, ~1 min for make_speech_data.py's 225 utterances):

    python benchmarks/bench_asr.py --errors runs/bench-asr-accuracy/ours
"""

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

import benchlib  # the parent side shared with the other benchmarks (this folder is sys.path[0])

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import nonneg_int, pos_float, pos_int  # noqa: E402  (the trainers' flag types)

PRESETS = ("original", "optimized", "minimal")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS), help="presets to measure")
parser.add_argument("--batch-sizes", nargs="+", type=pos_int, default=[2, 8], metavar="N",
                    help="utterances per step (the seed's T4 used 2)")
parser.add_argument("--subsample", nargs="+", type=int, choices=[4, 1], default=[4, 1],
                    help="time subsampling settings to compare (1 = the seed's model)")
parser.add_argument("--seconds", type=pos_float, default=10.0, help="utterance length")
parser.add_argument("--chars", type=pos_int, default=100, help="characters per transcript (~10 per second)")
parser.add_argument("--vocab", type=pos_int, default=200, help="vocabulary size (the seed's vocab.json: 200)")
parser.add_argument("--steps", type=pos_int, default=2, help="timed optimizer steps per configuration")
parser.add_argument("--warmup", type=nonneg_int, default=1, help="untimed steps first")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto = cuda when available; CUDA runs bf16 (fp16 + GradScaler where unsupported)")
parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "compare"], default="auto",
                    help="auto = the --device default above (fp32 on CPU); bf16 = bf16 autocast for every "
                         "configuration; compare = each configuration in fp32 and in bf16, alternating, and "
                         "a bf16 vs fp32 table (with --accuracy: train_asr.py in both, test CER)")
parser.add_argument("--repeats", type=pos_int, default=1, metavar="R",
                    help="--precision compare: runs per configuration and precision, fp32 and bf16 "
                         "alternating; the table shows medians")
parser.add_argument("--worker", default=None, help="internal: PRESET,BATCH,SUBSAMPLE measured in this process")
parser.add_argument("--accuracy", default=None, metavar="DIR",
                    help="instead of the step table: train_asr.py's minimal preset vs a BiGRU-CTC on the set "
                         "in DIR (train/val/test.jsonl, e.g. from make_speech_data.py), equal CPU time")
parser.add_argument("--ours-flags", default="", metavar="FLAGS",
                    help="--accuracy: extra train_asr.py flags, e.g. \"--lr 5e-4 --epochs 10\" (the seed's values)")
parser.add_argument("--threads", type=pos_int, default=1,
                    help="--accuracy: torch threads of each of the two trainings that run side by side")
parser.add_argument("--out", default="runs/bench-asr-accuracy", metavar="DIR",
                    help="--accuracy: folder for both runs (replaced)")
parser.add_argument("--ours-run", default=None, metavar="RUN",
                    help="--accuracy: a finished train_asr.py run folder of that command, instead of training ours")
parser.add_argument("--bigru-out", default=None, metavar="FILE",
                    help="--accuracy: a saved BiGRU worker output (bigru.out) that ran at least the budget, "
                         "instead of training it: its best epoch by val CER within the budget")
parser.add_argument("--budget-s", type=pos_float, default=None, metavar="S",
                    help="--accuracy: the BiGRU's CPU seconds (default: the CPU time ours used)")
parser.add_argument("--bigru-augment", choices=["specaugment", "ours"], default="specaugment",
                    help="--accuracy: the BiGRU's augmentation: SpecAugment (the first try), or ours (the minimal "
                         "preset's speed perturbation on top)")
parser.add_argument("--errors", default=None, metavar="RUN",
                    help="instead of the step table: where a finished train_asr.py run on manifests errs, "
                         "its val and test CER split by words known, rare and never heard in training (and "
                         "test_known_accents.jsonl's, where make_speech_data.py left one beside the test manifest)")
parser.add_argument("--bigru-worker", default=None, help="internal: train the BiGRU on this set for --budget-s")


# -----------------------------------------------------------------------------
# worker: one configuration, one fresh process

def worker(args):
    import torch
    import common
    import train_asr

    preset, bs, sub = args.worker.split(",")
    bs, sub = int(bs), int(sub)
    torch.manual_seed(0)
    choice = argparse.Namespace(device=args.device, precision=args.precision)  # compare's workers get fp32/bf16
    device, amp_dtype, scaler, _ = common.setup_device(choice)
    frames = int(args.seconds * 100) + 1  # 10 ms hop
    U = args.chars
    batch = {"feats": torch.randn(bs, frames, train_asr.N_MELS), "feat_len": torch.full((bs,), frames),
             "chars": torch.randint(5, args.vocab, (bs, U)), "tgt_len": torch.full((bs,), U)}
    batch["dec_in"] = torch.cat([torch.full((bs, 1), train_asr.SOS), batch["chars"]], 1)
    batch["dec_out"] = torch.cat([batch["chars"], torch.full((bs, 1), train_asr.EOS)], 1)
    batch = {k: v.to(device) for k, v in batch.items()}
    rss_base = psutil.Process().memory_info().rss / 2**20

    model = train_asr.build_model(train_asr.PRESETS[preset], args.vocab,
                                  {"heads": 4, "dropout": 0.1, "subsample": sub}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times, micro_bs = [], bs
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss, _, micro_bs = common.train_step(model, optimizer, scaler, batch,
                                              lambda m, b: train_asr.loss_fn(m, b, 0.3), micro_bs, clip=5.0,
                                              device=device, amp_dtype=amp_dtype, log=lambda msg: print(msg, file=sys.stderr))
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    print(json.dumps({
        "preset": preset, "batch": bs, "subsample": sub, "params": sum(p.numel() for p in model.parameters()),
        "step_s": step_s, "samples_per_s": bs / step_s, "loss_last": loss, "rss_base_mb": rss_base,
        "peak_rss_mb": common.peak_memory_mb(torch.device("cpu")),
        "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "micro_bs": micro_bs,
        **benchlib.runtime_info(device, choice.precision + (" + GradScaler" if scaler.is_enabled() else ""))}))
    return 0


# -----------------------------------------------------------------------------
# the practitioner's baseline: 2-layer BiGRU-CTC on train_asr.py's features, greedy decoding

def bigru_model(vocab, hidden=256, stack=4):
    """Frames stacked 4 at a time (40 ms, as ours after its x4 subsampling; a quarter of the GRU
    steps) -> 2 bidirectional GRU layers of 256 per direction -> characters + blank.
    2.1M parameters at a 32-symbol vocabulary."""
    import torch.nn as nn

    class BiGRUCTC(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = stack
            self.gru = nn.GRU(stack * 80, hidden, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
            self.head = nn.Linear(2 * hidden, vocab)

        def forward(self, feats, lengths):  # feats (B, T, 80)
            B, T, C = feats.shape
            T4 = T // self.stack
            x = feats[:, :T4 * self.stack].reshape(B, T4, self.stack * C)  # (B, T/4, 320)
            lengths = (lengths // self.stack).clamp(min=1)
            # packed: the backward direction starts at each utterance's last real frame, not in padding
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            h, _ = self.gru(packed)
            h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=T4)
            return self.head(h).log_softmax(-1), lengths  # (B, T/4, V)
    return BiGRUCTC()


def bigru_worker(args):
    """Train the BiGRU on args.bigru_worker's manifests until this process has used args.budget_s
    CPU seconds (imports included), then print one JSON line: parameters, epochs, per-epoch val CER, test CER of
    the best epoch (and test_known_accents.jsonl's, where present, measured after the budget)."""
    import copy
    import torch
    import torch.nn.functional as F
    import train_asr as A

    torch.set_num_threads(args.threads)
    t0 = time.time()
    d = Path(args.bigru_worker)
    train, val, test = (A.read_manifest(d / f"{s}.jsonl", s)[0] for s in ("train", "val", "test"))
    known = d / "test_known_accents.jsonl"  # make_speech_data.py's second test split, where present
    known = A.read_manifest(known, known.name)[0] if known.is_file() else None
    itos = A.build_vocab(train)
    stoi = {c: i for i, c in enumerate(itos)}
    torch.manual_seed(0)
    model = bigru_model(len(itos))
    params = sum(p.numel() for p in model.parameters())
    # what a practitioner reaches for: Adam at 1e-3, halve on a validation plateau, clip 5,
    # batch 16, the same SpecAugment as ours (speed perturbation only with --bigru-augment ours)
    speed = A.SPEED_PERTURB["minimal"] if args.bigru_augment == "ours" else 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    aug = torch.Generator().manual_seed(1)

    def cer(items):
        model.eval()
        refs, hyps = [], []
        with torch.inference_mode():
            for k in range(0, len(items), 16):
                idxs = list(range(k, min(k + 16, len(items))))
                b = A.make_batch(items, idxs, stoi)
                lp, L = model(b["feats"], b["feat_len"])
                hyps += [A.to_text(h, itos) for h in A.ctc_greedy(lp, L)]
                refs += [items[i]["text"] for i in idxs]
        model.train()
        return A.error_rates(refs, hyps)[0]

    def time_up():
        return time.process_time() >= args.budget_s  # this process's CPU time since it started

    history, best, epoch, steps = [], (math.inf, None), 0, 0
    while not time_up():
        for idxs in A.bucket_batches(train, 16, 0, epoch):
            if time_up():
                break
            b = A.make_batch(train, idxs, stoi, aug, speed)
            lp, L = model(b["feats"], b["feat_len"])
            loss = F.ctc_loss(lp.transpose(0, 1), b["chars"], L, b["tgt_len"], blank=A.BLANK,
                              reduction="sum", zero_infinity=True) / b["tgt_len"].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            steps += 1
        else:  # a whole epoch: validate, remember the best
            epoch += 1
            v = cer(val)
            sched.step(v)
            history.append({"epoch": epoch, "val_cer": round(v, 3), "cpu_s": round(time.process_time(), 1)})
            print(f"bigru epoch {epoch}: val CER {v:.2f}% at {time.process_time():.0f} CPU s, "
                  f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            if v < best[0]:
                best = (v, copy.deepcopy(model.state_dict()))
                # the test CER a smaller budget would have reported (selected by val, not test)
                history[-1]["test_cer"] = round(cer(test), 3)
    if best[1] is not None:  # no completed epoch: the model as it stands
        model.load_state_dict(best[1])
    print(json.dumps({"params": params, "augment": A.describe_augment(True, speed), "epochs": epoch, "steps": steps,
                      "history": history,
                      "val_cer": round(best[0], 3) if best[1] is not None else None,
                      "test_cer": round(cer(test), 3), "cpu_s": round(time.process_time(), 1),
                      "wall_s": round(time.time() - t0, 1),
                      "test_known_accents_cer": round(cer(known), 3) if known else None}))
    return 0


def accuracy(args):
    """--accuracy: ours (the real train_asr.py), then the BiGRU for the same CPU time, then the table."""
    d = Path(args.accuracy).resolve()
    manifests = [d / f"{s}.jsonl" for s in ("train", "val", "test")]
    if not all(m.is_file() for m in manifests):
        print(f"error: --accuracy {d}: train.jsonl, val.jsonl and test.jsonl needed; make them with "
              f"python benchmarks/make_speech_data.py {d}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))  # torch reads it at start-up
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    if args.ours_run:
        run = Path(args.ours_run)
        if not (run / "summary.json").is_file():
            print(f"error: --ours-run {run}: no summary.json; let that run finish first", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        ours_wall = json.loads((run / "summary.json").read_text())["wall_s"]
        ours_cpu = None
    else:
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: a leftover would be resumed
        out.mkdir(parents=True)
        run = out / "ours"
        cmd = [sys.executable, str(REPO / "train_asr.py"), "--preset", "minimal",
               "--train-manifest", str(manifests[0]), "--val-manifest", str(manifests[1]),
               "--test-manifest", str(manifests[2]), *shlex.split(args.ours_flags), "--out", str(run)]
        print(f"training ours (log: {out / 'ours.log'}) ...", file=sys.stderr, flush=True)
        with open(out / "ours.log", "w") as log:
            t0, c0 = time.time(), os.times()
            # in the (fresh) output folder, so no optimal_config.json changes its defaults
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out).returncode
            ours_wall, c1 = time.time() - t0, os.times()
        # the finished child's CPU time (0 on Windows, which does not report it: then the wall time)
        ours_cpu = (c1.children_user + c1.children_system - c0.children_user - c0.children_system) or None
        if rc != 0:
            print(f"error: train_asr.py failed (exit {rc}); see {out / 'ours.log'}", file=sys.stderr)
            return 1
    budget = args.budget_s or ours_cpu or ours_wall
    if args.bigru_out:
        # every epoch that improved val CER recorded its test CER, so a longer BiGRU run answers
        # for any smaller budget: the last improving epoch that ended within it
        g = json.loads([l for l in Path(args.bigru_out).read_text().splitlines() if l.startswith("{")][-1])
        done = [h for h in g["history"] if h["cpu_s"] <= budget]
        if g["cpu_s"] < budget or not done:
            print(f"error: --bigru-out {args.bigru_out}: it ran {g['cpu_s']:.0f} CPU s, the budget is "
                  f"{budget:.0f}", file=sys.stderr)
            return 2
        g.update(epochs=done[-1]["epoch"], test_cer=[h for h in done if "test_cer" in h][-1]["test_cer"],
                 cpu_s=budget, wall_s=None, history=done)
    else:
        print(f"training the BiGRU for {budget:.0f} CPU seconds ...", file=sys.stderr, flush=True)
        gru = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--bigru-worker", str(d),
                              "--budget-s", str(budget), "--threads", str(args.threads),
                              "--bigru-augment", args.bigru_augment],
                             stdout=subprocess.PIPE, text=True, env=env)
        (out / "bigru.out").write_text(gru.stdout)  # its JSON line, kept beside ours' run folder
        lines = [l for l in gru.stdout.splitlines() if l.startswith("{")]
        if gru.returncode != 0 or not lines:
            print(f"error: the BiGRU worker failed (exit {gru.returncode}); its output is above", file=sys.stderr)
            return 1
        g = json.loads(lines[-1])
    s = json.loads((run / "summary.json").read_text())
    a = json.loads((run / "args.json").read_text())["settings"]
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    import train_asr as A
    ours_aug = A.describe_augment(a["spec_augment"]["value"], a.get("speed_perturb", {}).get("value"))  # older: none
    shown = " ".join(["train_asr.py --preset minimal"] + [f"--{k}-manifest {Path(args.accuracy) / k}.jsonl"
                                                            for k in ("train", "val", "test")]
                     + ([args.ours_flags] if args.ours_flags else []))
    header = ["model", "parameters", "epochs", "CPU (s)", "wall (s)", "test CER, beam (%)",
              "test CER, greedy CTC (%)"]
    rows = [[f"train_asr.py minimal (lr {a['lr']['value']:g})", f"{s['params'] / 1e6:.2f}M", str(s["epochs"]),
             f"{ours_cpu:.0f}" if ours_cpu else "-", f"{ours_wall:.0f}",
             f"{s['test_cer']:.2f}", f"{s['test_cer_greedy_ctc']:.2f}"],
            ["BiGRU-CTC 2x256", f"{g['params'] / 1e6:.2f}M", str(g["epochs"]), f"{g['cpu_s']:.0f}",
             f"{g['wall_s']:.0f}" if g["wall_s"] else "-", "-", f"{g['test_cer']:.2f}"]]
    import torch  # only now: print_header imports it anyway, and both trainings are done
    res = {"torch": torch.__version__, "threads": args.threads, "device": "cpu", "device_name": "cpu",
           "precision": "fp32"}
    benchlib.print_header("ASR on real speech: train_asr.py minimal vs a BiGRU-CTC, equal CPU time",
                          sys.argv, res, busy, others)
    n = {k: sum(1 for _ in open(m)) for k, m in zip(("train", "val", "test"), manifests)}
    print(f"workload: {args.accuracy}: {n['train']} train / {n['val']} val / {n['test']} test utterances (test: voices "
          f"never heard in training); one training after the other, {args.threads} thread(s) each; ours: "
          f"`{shown}`, {s['steps']} steps, beam {a['beam']['value']}, {ours_aug}; BiGRU: "
          f"AdamW 1e-3, plateau halving, batch 16, {g.get('augment', 'SpecAugment')}, stopped at {budget:.0f} CPU s"
          f"{' (ours used that)' if budget == ours_cpu else ''}, best of its "
          f"epochs by val CER" + (f"; ours read from {args.ours_run}" if args.ours_run else "")
          + (f"; BiGRU read from {args.bigru_out}" if args.bigru_out else "") + "\n")
    benchlib.print_table(header, rows)
    print()
    print("BiGRU val CER by epoch (CPU s): "
          + ", ".join(f"{h['val_cer']:.1f}% ({h['cpu_s']:.0f})" for h in g["history"]) + "  ")
    benchlib.print_footer(busy, others, wall)
    return 0


def errors(args):
    """--errors RUN: decode RUN's val and test manifests (and make_speech_data.py's
    test_known_accents.jsonl where it sits beside the test manifest) with its best.pt (beam
    search, as its report), align reference and hypothesis words (difflib), charge each aligned span its
    character edits, and split the CER by the span's reference words: any never in the training
    transcripts (unseen), else any seen once or twice (rare), else known; spans of inserted
    words have no reference letters. The total CER is the run's own (test: as its summary); the
    points add up to that or a little more, as a word alignment is not always the cheapest
    character alignment."""
    import collections
    import difflib
    import types
    import torch
    import train_asr as A

    torch.set_num_threads(args.threads)
    run = Path(args.errors)
    if not (run / "args.json").is_file():
        print(f"error: --errors {run}: no args.json; pass a train_asr.py run folder (--out)", file=sys.stderr)
        return 2
    a = json.loads((run / "args.json").read_text())["settings"]
    paths = {k: a.get(f"{k}_manifest", {}).get("value") for k in ("train", "val", "test")}
    missing = [f"--{k}-manifest" for k, v in paths.items() if not v or not Path(v).is_file()]
    if missing:
        print(f"error: --errors {run}: its {' and '.join(missing)} not found from here (run this where the "
              f"run was started, with the manifests it trained on)", file=sys.stderr)
        return 2
    items = {k: A.read_manifest(v, f"--{k}-manifest")[0] for k, v in paths.items()}
    known = Path(paths["test"]).parent / "test_known_accents.jsonl"  # make_speech_data.py's
    if known.is_file():
        items["test_known_accents"] = A.read_manifest(known, str(known))[0]
    seen = collections.Counter(w for it in items["train"] for w in it["text"].split())
    model, itos, path, step = A.load_run(run, types.SimpleNamespace(resume=None))
    stoi = {c: i for i, c in enumerate(itos)}
    decode = types.SimpleNamespace(beam=a["beam"]["value"], decode_ctc_weight=a["decode_ctc_weight"]["value"])
    rows = []
    for split in [k for k in items if k != "train"]:
        t0 = time.time()
        cer, _, pairs = A.decode_set(model, items[split], itos, decode, torch.device("cpu"))
        greedy = A.evaluate(model, items[split], stoi, itos, a["ctc_weight"]["value"], torch.device("cpu"), None, 8)[1]
        edits, letters = collections.Counter(), collections.Counter()
        for ref, hyp in pairs:
            r, h = ref.split(), hyp.split()
            for _, i1, i2, j1, j2 in difflib.SequenceMatcher(a=r, b=h, autojunk=False).get_opcodes():
                counts = [seen[w] for w in r[i1:i2]]
                kind = "inserted" if not counts else "unseen" if min(counts) == 0 else \
                    "rare" if min(counts) < 3 else "known"
                span = " ".join(r[i1:i2])
                edits[kind] += A.edit_distance(span, " ".join(h[j1:j2]))
                letters[kind] += len(span)
        total = sum(len(ref) for ref, _ in pairs)
        cells = [f"{100 * letters[k] / total:.0f} %, {100 * edits[k] / max(1, letters[k]):.1f} % "
                 f"({100 * edits[k] / total:.1f} points)" for k in ("known", "rare", "unseen")]
        rows.append([split, str(len(pairs)), f"{cer:.2f}", f"{greedy:.2f}", *cells,
                     f"{100 * edits['inserted'] / total:.1f}"])
        print(f"{split}: {len(pairs)} utterances decoded in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"## Where {run} errs: {path.name} (step {step}), beam {decode.beam}, CTC weight "
          f"{decode.decode_ctc_weight}\n")
    print(f"command: `python {' '.join(shlex.quote(x) for x in sys.argv)}`  ")
    print("each cell: share of the split's letters, CER within, and the points of CER it adds; known words "
          "occur 3+ times in the training transcripts, rare 1-2, a span with an unseen word counts as unseen\n")
    benchlib.print_table(["split", "utterances", "CER (%)", "greedy CTC CER (%)", "known words", "rare words",
                          "spans with an unseen word", "inserted words (points)"], rows)
    return 0


def precision_accuracy(args):
    """--accuracy DIR --precision compare: train_asr.py --preset minimal on DIR's manifests with
    --precision fp32 and with --precision bf16, alternating (--repeats rounds), each in a fresh run
    folder; then its own samples/s and test CER side by side. No BiGRU: the question is what bf16
    does to ours."""
    from common import cpu_has_bf16
    d = Path(args.accuracy).resolve()
    manifests = [d / f"{s}.jsonl" for s in ("train", "val", "test")]
    if not all(m.is_file() for m in manifests):
        print(f"error: --accuracy {d}: train.jsonl, val.jsonl and test.jsonl needed; make them with "
              f"python benchmarks/make_speech_data.py {d}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # fresh runs: a leftover would be resumed
    out.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))  # torch reads it at start-up
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    runs = {p: [] for p in benchlib.PRECISIONS}
    for repeat in range(args.repeats):
        for prec in benchlib.precision_order(repeat):
            run = out / f"{prec}-{repeat}"
            cmd = [sys.executable, str(REPO / "train_asr.py"), "--preset", "minimal",
                   "--train-manifest", str(manifests[0]), "--val-manifest", str(manifests[1]),
                   "--test-manifest", str(manifests[2]), *shlex.split(args.ours_flags),
                   "--precision", prec, "--out", str(run)]
            print(f"training train_asr.py --precision {prec} (log: {run}.log) ...", file=sys.stderr, flush=True)
            with open(f"{run}.log", "w") as log:
                # in the (fresh) output folder, so no optimal_config.json changes its defaults
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out).returncode
            if rc != 0:
                print(f"error: train_asr.py failed (exit {rc}); see {run}.log", file=sys.stderr)
                return 1
            s = json.loads((run / "summary.json").read_text())
            runs[prec].append(dict(s, cpu_bf16=cpu_has_bf16()))
            print(f"  {prec}: {s['samples_per_s']:.1f} samples/s, test CER {s['test_cer']:.2f}% (greedy CTC "
                  f"{s['test_cer_greedy_ctc']:.2f}%), {s['steps']} steps, {s['wall_s']:.0f} s",
                  file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    import torch  # only now: print_header imports it anyway, and the trainings are done
    res = {"torch": torch.__version__, "threads": args.threads, "device": "cpu", "device_name": "cpu",
           "precision": "fp32 vs bf16 autocast"}
    benchlib.print_header("ASR on real speech: train_asr.py minimal, fp32 vs bf16 autocast", sys.argv, res,
                          busy, others)
    s = runs["fp32"][0]
    print(f"workload: {args.accuracy}; `train_asr.py --preset minimal` + the three manifests"
          + (f" + `{args.ours_flags}`" if args.ours_flags else "") + f" + `--precision fp32` / `bf16`, "
          f"{s['steps']} steps, {args.threads} thread(s); samples/s is the trainer's own (training time "
          f"only), test CER its beam search on the best checkpoint; {args.repeats} repeat(s) per precision, "
          f"alternating; medians shown\n")
    benchlib.print_precision_table("model", {"train_asr.py minimal": runs}, "test CER (%)",
                                   "test_cer", "{:.2f}".format)
    greedy = "; ".join(f"{p} " + ", ".join(f"{r['test_cer_greedy_ctc']:.2f}" for r in runs[p])
                       for p in benchlib.PRECISIONS)
    print(f"test CER, greedy CTC (%), per repeat: {greedy}  ")
    benchlib.print_footer(busy, others, wall)
    return 0


# -----------------------------------------------------------------------------
# parent: every configuration in a fresh worker, then the table

def compare(args, flags, configs):
    """--precision compare: every configuration in fp32 and in bf16 autocast, each run in a fresh
    worker, the two precisions alternating run by run; then the bf16 vs fp32 table."""
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {f"{p}, x{s}, batch {b}": {prec: [] for prec in benchlib.PRECISIONS} for p, b, s in configs}
    n_runs, done = 2 * len(configs) * args.repeats, 0
    for repeat in range(args.repeats):
        for (p, b, s), runs in zip(configs, results.values()):
            for prec in benchlib.precision_order(repeat):
                t0 = time.perf_counter()
                res = benchlib.run_worker(Path(__file__).resolve(), f"{p},{b},{s}", flags + ["--precision", prec])
                runs[prec].append(res)
                done += 1
                print(f"[{done}/{n_runs}] {p:<9} batch {b} subsample x{s} {prec}: step {res['step_s']:.2f} s, "
                      f"loss {res['loss_last']:.3f}, peak RSS {res['peak_rss_mb']:.0f} MB "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    first = next(iter(results.values()))["fp32"][0]
    benchlib.print_header("ASR: fp32 vs bf16 autocast per preset x batch x subsampling", sys.argv,
                          dict(first, precision="fp32 vs bf16 autocast"), busy, others)
    print(f"workload: as the presets table (`python benchmarks/bench_asr.py`): {args.seconds:g} s utterances of "
          f"random features, {args.chars}-character transcripts; one training step = forward, loss, backward, "
          f"clip 5, AdamW (common.train_step, bf16: under bf16 autocast, weights and AdamW in fp32); "
          f"{args.warmup} warm-up + {args.steps} timed step(s), median; samples = utterances; {args.repeats} "
          f"repeat(s) per configuration and precision, each in a fresh process, fp32 and bf16 alternating\n")
    benchlib.print_precision_table("preset, subsampling, batch", results, "loss, last step", "loss_last",
                                   "{:.3f}".format)
    print("the CER of each precision: `--accuracy DIR --precision compare` (train_asr.py on real speech)  ")
    if any(r["micro_bs"] != r["batch"] for runs in results.values() for rs in runs.values() for r in rs):
        print("note: a configuration ran out of memory and halved its micro-batch (same batch, accumulated)  ")
    benchlib.print_footer(busy, others, wall)
    return 0


def main():
    args = parser.parse_args()
    if args.bigru_worker:
        import common
        common.run_main(lambda: bigru_worker(args))
    if args.errors:
        import common
        return common.run_main(lambda: errors(args))
    if args.accuracy and args.precision in ("fp32", "bf16"):
        parser.error(f"--accuracy with --precision {args.precision}: pass it to ours with --ours-flags "
                     f"\"--precision {args.precision}\" (the BiGRU runs fp32), or --precision compare")
    if args.accuracy:
        return precision_accuracy(args) if args.precision == "compare" else accuracy(args)
    if args.worker:
        import common
        common.run_main(lambda: worker(args))
    if args.chars > args.seconds * 100 / 4:
        parser.error(f"--chars {args.chars} is more than the {int(args.seconds * 25)} encoder frames of "
                     f"{args.seconds:g} s at x4 subsampling; CTC could not align it")
    flags = ["--seconds", str(args.seconds), "--chars", str(args.chars), "--vocab", str(args.vocab),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    configs = [(p, b, s) for p in args.presets for s in args.subsample for b in args.batch_sizes]
    if args.precision == "compare":
        return compare(args, flags, configs)
    flags += ["--precision", args.precision]
    busy, t_start, kids0 = benchlib.cpu_watch_start()
    results = {}
    for i, (p, b, s) in enumerate(configs, start=1):
        t0 = time.perf_counter()
        res = benchlib.run_worker(Path(__file__).resolve(), f"{p},{b},{s}", flags)
        results[(p, b, s)] = res
        print(f"[{i}/{len(configs)}] {p:<9} batch {b} subsample x{s}: step {res['step_s']:.2f} s, peak RSS "
              f"{res['peak_rss_mb']:.0f} MB ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall, others = benchlib.cpu_watch_end(t_start, kids0)

    first = next(iter(results.values()))
    gpu = first["device"] == "cuda"
    header = ["preset", "subsample", "parameters", "batch", "step (s)", "utterances/s",
              "peak RSS above runtime (MB)"] + (["peak GPU memory (MB)"] if gpu else [])
    rows = []
    for (p, b, s), r in results.items():
        rows.append([p, f"x{s}", f"{r['params'] / 1e6:.2f}M", str(b), f"{r['step_s']:.2f}", f"{r['samples_per_s']:.2f}",
                     f"{r['peak_rss_mb'] - r['rss_base_mb']:.0f}"] + ([f"{r['gpu_peak_mb']:.0f}"] if gpu else []))
    benchlib.print_header("ASR: presets x batch x subsampling", sys.argv, first, busy, others)
    print(f"workload: {args.seconds:g} s utterances ({int(args.seconds * 100) + 1} feature frames), "
          f"{args.chars}-character transcripts, vocabulary {args.vocab}; one training step = forward, "
          f"CTC 0.3 + attention 0.7 loss, backward, clip 5, AdamW; {args.warmup} warm-up + {args.steps} timed "
          f"step(s), median; each configuration in a fresh process\n")
    benchlib.print_table(header, rows)
    print()
    key = "gpu_peak_mb" if gpu else None
    for p in args.presets:
        for b in args.batch_sizes:
            if (p, b, 4) in results and (p, b, 1) in results:
                r4, r1 = results[(p, b, 4)], results[(p, b, 1)]
                m4 = r4[key] if key else r4["peak_rss_mb"] - r4["rss_base_mb"]
                m1 = r1[key] if key else r1["peak_rss_mb"] - r1["rss_base_mb"]
                print(f"{p}, batch {b}: subsampling x4 takes {benchlib.fmt_ratio(r4['step_s'], r1['step_s'])} the "
                      f"step time and {benchlib.fmt_ratio(m4, m1)} the memory of no subsampling  ")
    print("peak RSS includes the Python + torch runtime; the column shows what the model, its gradients, "
          "AdamW state and activations added  ")
    if any(r["micro_bs"] != r["batch"] for r in results.values()):
        print("note: a configuration ran out of memory and halved its micro-batch (same batch, accumulated)  ")
    benchlib.print_footer(busy, others, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
