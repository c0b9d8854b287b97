"""make_speech_data.py -- a small real speech set for train_asr.py: 1,425 spoken clauses, test on unseen voices.

    python benchmarks/make_speech_data.py data/espeak        # ~2 min on 2 cores; then:
    python train_asr.py --preset minimal --train-manifest data/espeak/train.jsonl \\
        --val-manifest data/espeak/val.jsonl --test-manifest data/espeak/test.jsonl --out runs/espeak

The text is real English nobody here wrote: clauses of the Python reference manual that ships
with every Python (`pydoc_data.topics`, the text behind `help("if")`), split at punctuation,
kept when they are 4-8 words of plain letters (1.5-3.5 s spoken), lower-cased. The speech is
espeak-ng's formant synthesizer: a voice is an accent (en-us, en-gb-scotland, ...) plus a
speaker variant (m1, f3, ...; pitch and timbre), and every utterance gets its own speed
(130-190 words/min) and base pitch (30-70). sox resamples espeak's 22,050 Hz output to 16 kHz
16-bit mono WAV.

Splits (every clause is used once, so no test sentence was heard in training either):
    train.jsonl  1,200 clauses, 8 training voices
    val.jsonl      100 clauses, the same 8 voices
    test.jsonl     125 clauses, 3 voices whose accent and variant are both absent from training
    test_known_accents.jsonl   the same 125 clauses, speeds and pitches, each voice's accent swapped
                   for a training one (en-gb, en-us, en-gb-scotland): unseen speakers, known accents

--train-clauses N speaks N training clauses instead of 1,200 (more speech and more words; val,
test and the first 1,200 stay byte for byte the same): the manual's 1,214 unused clauses first,
then clauses of the standard library's module docstrings (up to 8,961 in all with Python 3.11;
which files the stdlib folder holds differs between builds of one Python, Debian's has three
more, so past 2,414 the same bytes need the same build).

--heard-text builds the easier set that issue 13's ASR figures look like (1.8 % CER): 300 clauses,
each spoken by 4 of the 8 training voices (train), and val / test speak 100 / 125 of those same
clauses with a training voice that did not speak it / with the 3 unseen voices. The test voices
are still unseen; the sentences are not.

The manifests are JSONL in train_asr.py's format (audio_filepath relative to the manifest,
text, duration, speaker). The set is deterministic: the same Python (whose manual is the text),
espeak-ng and --seed give byte-identical WAVs; the script prints a digest of train, val and
test.jsonl to compare. Needs espeak-ng and sox (`apt-get install -y espeak-ng sox`); without them it says so.
"""

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import wave
from pathlib import Path

import numpy as np

# (accent, variant). The test voices share neither an accent nor a variant with training ones:
# the model has to generalise to a new speaker, not recognise a known one.
TRAIN_VOICES = [("en-us", "m1"), ("en-us", "f1"), ("en-gb", "m3"), ("en-gb", "f3"),
                ("en-gb-scotland", "m5"), ("en-029", "f4"), ("en-gb-x-gbclan", "m7"), ("en-us", "m6")]
TEST_VOICES = [("en-gb-x-rp", "m2"), ("en-us-nyc", "f2"), ("en-gb-x-gbcwmd", "m4")]
# test_known_accents.jsonl: the test utterances again (clause, variant, speed, pitch), each test
# accent swapped for a training one: unseen speakers of the accents training has
KNOWN_ACCENT = {"en-gb-x-rp": "en-gb", "en-us-nyc": "en-us", "en-gb-x-gbcwmd": "en-gb-scotland"}
SPLITS = {"train": 1200, "val": 100, "test": 125}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
parser.add_argument("out", help="folder for wav/ and the manifests (created)")
parser.add_argument("--seed", type=int, default=0, help="which clauses go where, and each utterance's speed/pitch")
parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes at once")
parser.add_argument("--train-clauses", type=int, default=SPLITS["train"],
                    help="training clauses (default 1200): more come after those (the manual's, then the standard "
                         "library's docstrings), so val, test and the first 1,200 stay the same")
parser.add_argument("--heard-text", action="store_true",
                    help="val and test speak clauses that training speaks too (other voices): the easier set")
HEARD_CLAUSES, HEARD_REPEATS = 300, 4  # --heard-text: 300 clauses x 4 training voices = 1,200 utterances


def clauses(docstrings=False):
    """Every distinct 4-8 word, letters-only clause of the Python reference manual, sorted; with
    docstrings, those of the docstrings of the standard library's top-level modules instead (the
    text for training clauses past the manual's), less any the manual has."""
    import pydoc_data.topics  # stdlib: the manual's text for help()
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    if docstrings:
        texts = [ast.get_docstring(node) or "" for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
                 for node in ast.walk(ast.parse(path.read_bytes()))
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out = set()  # (joined by spaces: ~45 docstring clauses run from one docstring into the next)
    for piece in re.split(r"[.!?;:,()\n\"]+", " ".join(texts)):
        piece = " ".join(piece.split())
        # letters, spaces and apostrophes only: digits and symbols would be read out in ways
        # the transcript cannot spell ("2" -> "two", "==" -> "equals equals")
        if re.fullmatch(r"[A-Za-z][A-Za-z' ]+[a-z]", piece) and 4 <= len(piece.split()) <= 8 and len(piece) <= 50:
            out.add(piece.lower())
    return sorted(out - set(clauses()) if docstrings else out)


def assign(pool, rng, heard_text=False, train_clauses=SPLITS["train"], more=()):
    """[(split, clause, voice)] in split order. By default every clause is used once (voices in
    rotation), and training clauses past the default 1,200 come last (the manual's unused ones,
    then those of `more`), so that the default set's clauses, speeds and pitches do not move;
    with heard_text, training speaks each of HEARD_CLAUSES clauses with HEARD_REPEATS training
    voices, val a clause of those with a training voice that did not speak it there, test one
    with an unseen voice."""
    if not heard_text:
        pool = [pool[i] for i in rng.permutation(len(pool))] + list(more)
        out, k = [], 0
        for split, n in SPLITS.items():
            voices = TEST_VOICES if split == "test" else TRAIN_VOICES
            out += [(split, pool[k + i], voices[i % len(voices)]) for i in range(n)]
            k += n
        V = len(TRAIN_VOICES)
        return out + [("train", pool[k + i], TRAIN_VOICES[(SPLITS["train"] + i) % V])
                      for i in range(train_clauses - SPLITS["train"])]
    pool = [pool[i] for i in rng.permutation(len(pool))[:HEARD_CLAUSES]]
    V = len(TRAIN_VOICES)  # clause c is spoken in training by voices 2c, 2c+1, ..., 2c+3 (mod 8)
    out = [("train", c, TRAIN_VOICES[(2 * i + r) % V]) for i, c in enumerate(pool) for r in range(HEARD_REPEATS)]
    out += [("val", pool[i], TRAIN_VOICES[(2 * i + HEARD_REPEATS + j % (V - HEARD_REPEATS)) % V])
            for j, i in enumerate(sorted(rng.permutation(len(pool))[:SPLITS["val"]]))]
    out += [("test", pool[i], TEST_VOICES[j % len(TEST_VOICES)])
            for j, i in enumerate(sorted(rng.permutation(len(pool))[:SPLITS["test"]]))]
    return out


def speak(job):
    """(path, text, voice, speed, pitch) -> seconds; espeak-ng's WAV on stdout, resampled by sox.
    sox -D: no dither, so the output is the same bytes every time."""
    path, text, voice, speed, pitch = job
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         check=True, stdout=subprocess.PIPE).stdout
    subprocess.run(["sox", "-D", "-t", "wav", "-", "-r", "16000", "-b", "16", "-c", "1", str(path)],
                   input=wav, check=True, stderr=subprocess.DEVNULL)
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def main():
    args = parser.parse_args()
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not found; install with `apt-get install -y espeak-ng sox`",
              file=sys.stderr)
        return 2
    pool = clauses()
    if args.heard_text and args.train_clauses != SPLITS["train"]:
        print("error: --train-clauses is for the default set; --heard-text has its own 300 x 4", file=sys.stderr)
        return 2
    if args.train_clauses < SPLITS["train"]:
        print(f"error: --train-clauses {args.train_clauses}: give {SPLITS['train']} or more", file=sys.stderr)
        return 2
    need = HEARD_CLAUSES if args.heard_text else sum(SPLITS.values()) - SPLITS["train"] + args.train_clauses
    more = []
    if len(pool) < need and not args.heard_text:  # its own generator: the default set's draws stay
        more = clauses(docstrings=True)
        more = [more[i] for i in np.random.default_rng([args.seed, 1]).permutation(len(more))]
    if len(pool) + len(more) < need:
        hint = (f"; --train-clauses {len(pool) + len(more) - need + args.train_clauses} at most"
                if args.train_clauses > SPLITS["train"] else "")
        print(f"error: this Python gives {len(pool) + len(more)} clauses, {need} needed{hint}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    (out / "wav").mkdir(parents=True, exist_ok=True)

    jobs, rows = [], {s: [] for s in SPLITS}
    for split, text, (accent, variant) in assign(pool, rng, args.heard_text, args.train_clauses, more):
        speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
        name = f"wav/{split}_{len(rows[split]):04d}.wav"
        rows[split].append({"audio_filepath": name, "text": text, "speaker": f"{accent}+{variant}",
                            "speed": speed, "pitch": pitch})
        jobs.append((rows[split][-1], out / name, text, f"{accent}+{variant}", speed, pitch))
    rows["test_known_accents"] = []
    for r in rows["test"]:
        accent, variant = r["speaker"].split("+")
        voice, name = f"{KNOWN_ACCENT[accent]}+{variant}", r["audio_filepath"].replace("test_", "test_known_accents_")
        rows["test_known_accents"].append(dict(r, audio_filepath=name, speaker=voice))
        jobs.append((rows["test_known_accents"][-1], out / name, r["text"], voice, r["speed"], r["pitch"]))
    print(f"speaking {len(jobs)} clauses with {len(TRAIN_VOICES)} training + {len(TEST_VOICES)} test voices "
          f"into {out} ...", file=sys.stderr, flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:  # the work is in the subprocesses
        for row, seconds in zip((job[0] for job in jobs), ex.map(speak, (job[1:] for job in jobs))):
            row["duration"] = round(seconds, 3)  # in job order: extra training clauses come last
    digest = hashlib.sha256()
    for split, rs in rows.items():
        text = "".join(json.dumps(r) + "\n" for r in rs)
        if split in SPLITS:  # the digest is of the three manifests train_asr.py reads
            digest.update(text.encode())
        tmp = out / f"{split}.jsonl.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / f"{split}.jsonl")  # manifests last: a killed run leaves none
        hours = sum(r["duration"] for r in rs) / 3600
        print(f"{split}: {len(rs)} utterances, {hours * 60:.1f} min, {len({r['speaker'] for r in rs})} voices")
    print(f"manifest digest {digest.hexdigest()[:16]} (Python {sys.version.split()[0]}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
