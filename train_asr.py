"""train_asr.py -- a speech recognizer: Conformer encoder + Transformer decoder, CTC + attention.

After the KonkaniVani ASR project (Conformer encoder, Transformer decoder, hybrid CTC/attention
loss, character vocabulary), rebuilt to fit small GPUs: the input is subsampled x4 in time before
the encoder (the seed had no subsampling, so self-attention ran over every 10 ms frame), the
batch size is fitted to the machine, and out-of-memory is recovered from, not fatal.

    python train_asr.py --quick --out runs/a                      # laptop CPU: built-in set, minutes
    python train_asr.py --transcribe a.wav b.wav --out runs/a     # print transcripts
    python train_asr.py --quick --eval-only --out runs/a          # score its best.pt again: eval.json
    python train_asr.py --train-manifest train.jsonl --val-manifest val.jsonl --out runs/mine
    python benchmarks/make_speech_data.py data/espeak             # real speech (espeak-ng), then:
    python train_asr.py --preset minimal --train-manifest data/espeak/train.jsonl \\
        --val-manifest data/espeak/val.jsonl --test-manifest data/espeak/test.jsonl --out runs/espeak
    python train_asr.py --train-manifest train.jsonl --batch-size 2 --grad-accum 4 --precision auto \\
        --d-model 192 --encoder-layers 8 --decoder-layers 4   # the seed's T4 line (its spellings
        # --batch_size, --gradient_accumulation_steps, --mixed_precision, --d_model, ... work too)

A manifest is JSONL ({"audio_filepath": ..., "text": ..., "duration": ...} per line) or CSV/TSV
with a header naming path,text; paths are relative to the manifest. Audio: PCM WAV, any rate
(resampled to 16 kHz), mono or stereo. Re-running the same command resumes.
"""

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import random
import shlex
import sys
import time
import unicodedata
import wave
from fractions import Fraction
from pathlib import Path

# Must be set before torch initialises CUDA: lets the caching allocator grow segments instead of
# leaving fragments between variable-length batches (the seed's fix for its T4 OOMs).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import common  # noqa: E402
from common import UserError  # noqa: E402

PAD, BLANK, SOS, EOS, UNK = 0, 1, 2, 3, 4
SPECIALS = ["<pad>", "<blank>", "<sos>", "<eos>", "<unk>"]  # the seed's vocab.json order
SR = 16000
# the flags that choose the utterances of each split (the built-in set's size: --dataset-size, or --quick's)
DATA_FLAGS = ("train_manifest", "val_manifest", "test_manifest", "val_frac", "dataset_size", "seed", "max_duration")
MIN_SECONDS = 0.1  # shorter clips give the x4 subsampler no frame at all (it needs 7 = 70 ms)
N_FFT, HOP, N_MELS = 400, 160, 80  # 25 ms window, 10 ms hop, 80 mel bins (seed)
# name: (d_model, encoder layers, decoder layers). The seed's table, plus "tiny" for --quick.
PRESETS = {"original": (256, 12, 6), "optimized": (192, 8, 4), "minimal": (128, 6, 3), "tiny": (96, 2, 1)}
# Defaults per preset where the flag is not given (the seed's, for all, in brackets), measured with the
# minimal model for 15 epochs on make_speech_data.py's set (docs/real-data.md "ASR on real speech"):
# --lr [5e-4]: 2e-3 took unseen-voice CER from 14.4 % to 1.8 % on 1,425 espeak-ng utterances (issue 13);
#   tiny (--quick) learns in a few hundred steps at it too; the larger presets keep 5e-4 (not re-measured)
# --epochs [10]: at 10 the cosine schedule stops the minimal model half-way down its learning curve
# --ctc-weight [0.3]: val CER 13.7 % at 0.7, 14.8 % at 0.5 over 3 seeds, and a better beam-search test CER
# effective batch [16]: val CER 15.5 % at 8, 16.8 % at 16, 15.9 % at 4 (twice the steps in the same epochs)
# --dropout [0.1]: the minimal model underfits, and on a CPU a fifth of its step is drawing masks:
#   at 0, val CER 14.8 % vs 15.6 %, test (beam) 14.2 % vs 15.9 %, 22 % less CPU per step
# --speed-perturb [none]: test (unseen voices, beam) 12.5 / 12.6 / 12.4 % vs 14.6 / 15.1 / 14.1 % without
LR = {"minimal": 2e-3, "tiny": 2e-3}
MINIMAL_EPOCHS = 15
CTC_WEIGHT = {"minimal": 0.7}
EFFECTIVE_BATCH = {"minimal": 8}
DROPOUT = {"minimal": 0.0}
SPEED_PERTURB = {"minimal": 0.1}
MANIFESTS = ("train_manifest", "val_manifest", "test_manifest")  # --sha256 pairs with them in this order

# -----------------------------------------------------------------------------
# config

parser = common.make_parser(__doc__, trainer="asr", epochs=10, lr=None, effective_batch=16,
                            save_every=100, eval_every=0, log_every=10)
parser.set_defaults(clip=5.0)  # the seed's gradient clipping
g = parser.add_argument_group("speech recognizer")
g.add_argument("--train-manifest", metavar="PATH",
               help="training data: JSONL or CSV/TSV manifest (default: built-in synthetic speech set)")
g.add_argument("--val-manifest", metavar="PATH",
               help="validation manifest (default: --val-frac of the training manifest)")
g.add_argument("--test-manifest", metavar="PATH",
               help="test manifest, decoded with beam search at the end (default: none with your data)")
g.add_argument("--val-frac", type=float, default=0.05,
               help="share of the training manifest held out when there is no --val-manifest")
g.add_argument("--max-duration", type=common.pos_float, default=30.0, metavar="S",
               help="drop utterances longer than S seconds (seed: 30); lower it to save memory")
g.add_argument("--dataset-size", type=common.pos_int, metavar="N",
               help="built-in set: training utterances (default 800 with --quick, else 3000)")
g.add_argument("--synthetic-dir", default="data", metavar="DIR",
               help="where the built-in set's WAVs and manifests are written (once, then reused)")
g.add_argument("--preset", choices=list(PRESETS),
               help="model size, parameters at a 200-character vocabulary: original d256 12+6 layers (24.9M), "
                    "optimized d192 8+4 (9.5M; the seed's 9.4M with --subsample 1), minimal d128 6+3 (3.3M), tiny "
                    "d96 2+1 (0.7M) (default: optimized; tiny with --quick). minimal and tiny train at --lr 2e-3, and "
                    "minimal for 15 --epochs at an effective batch of 8 without dropout, with speed perturbation 0.1, "
                    "unless given (seed: 5e-4, 10, 16, 0.1, 0; docs/real-data.md \"ASR on real speech\")")
g.add_argument("--d-model", "--d_model", dest="d_model", type=common.pos_int,
               help="model width (overrides the preset; a multiple of --heads; --d_model: the seed's spelling)")
g.add_argument("--encoder-layers", "--encoder_layers", dest="encoder_layers", type=common.pos_int,
               help="Conformer blocks (overrides the preset; --encoder_layers: the seed's spelling)")
g.add_argument("--decoder-layers", "--decoder_layers", dest="decoder_layers", type=common.pos_int,
               help="Transformer decoder layers (overrides the preset; --decoder_layers: the seed's spelling)")
g.add_argument("--heads", type=common.pos_int, default=4, help="attention heads (seed: 4)")
g.add_argument("--dropout", type=float,
               help="dropout in encoder and decoder (default: 0 for minimal, 0.1 otherwise, the seed's)")
g.add_argument("--subsample", type=int, choices=[4, 1], default=4,
               help="time subsampling before the encoder: 4 = two stride-2 convolutions (40 ms frames), "
                    "1 = none, as in the seed (4x the frames, ~16x the attention memory)")
g.add_argument("--ctc-weight", type=float,
               help="loss = w * CTC + (1 - w) * attention cross-entropy (default: 0.7 for minimal, "
                    "measured on real speech; the seed's 0.3 for the others)")
g.add_argument("--spec-augment", action=argparse.BooleanOptionalAction, default=True,
               help="SpecAugment in training: one frequency mask (up to 27 bins) and one "
                    "time mask (up to 70 frames or a fifth of the utterance)")
g.add_argument("--speed-perturb", type=float, metavar="W",
               help="with --spec-augment: play each utterance 1 +- W times as fast (resampled: tempo and pitch "
                    "together) (default: 0.1 for minimal, measured on unseen voices; 0 = off, the seed's)")
g.add_argument("--schedule", choices=["cosine", "plateau"], default="cosine",
               help="after warmup: cosine decay, or halve the LR when val loss has not improved for "
                    "more than 3 evaluations in a row (the seed's ReduceLROnPlateau, patience 3)")
g.add_argument("--empty-cache-every", type=common.nonneg_int, default=50, metavar="N",
               help="CUDA: return cached blocks to the driver every N batches (0 = never)")
g.add_argument("--beam", type=common.pos_int, default=4, help="beam width for the attention decoder")
g.add_argument("--decode-ctc-weight", type=float, default=0.5,
               help="beam search score = w * CTC prefix score + (1 - w) * attention (0 = attention only)")
g.add_argument("--transcribe", nargs="+", metavar="WAV",
               help="print transcripts of these WAV files with the model in --out (no training)")


# -----------------------------------------------------------------------------
# audio: WAV in, 16 kHz mono float out

class TruncatedWav(UserError):
    """Fewer sample bytes than the header says: a bad row (--bad-rows)."""


def missing_bytes(head, size):
    """Bytes of the data chunk that a file of `size` bytes lacks, by the chunk headers in `head`."""
    i = 12  # after "RIFF", the RIFF size, "WAVE"
    while i + 8 <= len(head):
        n = int.from_bytes(head[i + 4:i + 8], "little")
        if head[i:i + 4] == b"data":
            # 0xFFFFFFFF: a streaming writer (ffmpeg to a pipe) that never knew the size: to the end
            return 0 if n == 0xFFFFFFFF else max(0, i + 8 + n - size)
        i += 8 + n + (n & 1)  # chunks are padded to an even length
    return 0


def open_wav(path, header_only=False):
    """-> (channels, bytes per sample, rate, frames, raw sample bytes or None). WAVE_FORMAT_EXTENSIBLE
    PCM (sox's and ffmpeg's 24/32-bit and multichannel WAVs; `wave` reads it only from Python 3.12) is
    rewritten to plain PCM. A truncated file is an error: `wave` would return what is there, and a clip
    cut mid-word would train on its whole transcript."""
    try:
        with open(path, "rb") as f:
            data, size = f.read(65536 if header_only else -1), os.fstat(f.fileno()).st_size
        i = data.find(b"fmt ", 12)  # format tag at +8; extensible: the real one (1 = PCM) at +32, in the GUID
        if i > 0 and data[i + 8:i + 10] == b"\xfe\xff" and data[i + 32:i + 34] == b"\x01\x00":
            data = data[:i + 8] + b"\x01\x00" + data[i + 10:]
        with wave.open(io.BytesIO(data), "rb") as w:
            info = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
            if info[2] <= 0 or info[1] not in (1, 2, 3, 4):
                raise UserError(f"{path}: unsupported WAV header ({info[2]} Hz, {8 * info[1]}-bit); use 16-bit PCM")
            if missing := missing_bytes(data, size):
                per_s = info[0] * info[1] * info[2]  # bytes per second of audio
                raise TruncatedWav(f"{path}: truncated: {missing:,} bytes of samples missing "
                                   f"({missing / max(1, per_s):.2f} s of its {info[3] / max(1, info[2]):.2f} s); "
                                   "copy or convert it again")
            return (*info, None if header_only else w.readframes(info[3]))
    except FileNotFoundError:
        raise UserError(f"{path}: audio file not found")
    except (wave.Error, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable PCM WAV file ({e}); convert it, e.g. "
                        "`ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav`")


def read_wav(path):
    """PCM WAV (8/16/24/32-bit, any rate, any channels) -> float32 tensor (samples,) at 16 kHz."""
    channels, width, rate, _, raw = open_wav(path)
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 2**15
    elif width == 3:  # little-endian 24-bit: put the 3 bytes in the top of an int32, keep the sign
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2**23
    else:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2**31
    x = torch.from_numpy(x.reshape(-1, channels).mean(1))  # stereo -> mono by averaging
    return resample(x, rate, SR) if rate != SR else x


def resample(x, sr_in, sr_out, zeros=16):
    """Band-limited resampling by a windowed-sinc polyphase filter, in plain torch. With
    up/down = sr_out/sr_in in lowest terms, output sample k*up + j sits at input position
    k*down + j*down/up: each of the `up` phases j is one FIR filter, so the whole resampling is one
    strided conv1d. The low-pass cutoff is the lower Nyquist rate, so downsampling does not alias."""
    # a rate that shares few factors with sr_out (15999 Hz) would need thousands of phases: the
    # ratio as a fraction with a denominator up to 1000 (15999 -> 16000 becomes 1:1, 2 ms over 30 s)
    up, down = Fraction(sr_out, sr_in).limit_denominator(1000).as_integer_ratio()
    if up == down:
        return x
    cutoff = min(1.0, up / down)  # fraction of the input Nyquist rate
    width = math.ceil(zeros / cutoff)  # filter half-width in input samples
    m = torch.arange(-width, width + down, dtype=torch.float64)  # tap offsets from k*down
    t = m[None, :] - torch.arange(up, dtype=torch.float64)[:, None] * down / up  # (up, taps)
    window = torch.where(t.abs() <= width, 0.5 * (1 + torch.cos(math.pi * t / width)), torch.zeros(()))
    h = (cutoff * torch.sinc(cutoff * t) * window).float()  # (up, taps)
    xp = F.pad(x[None, None], (width, width + down))
    y = F.conv1d(xp, h[:, None], stride=down)[0]  # (up, n): phase j of block k
    return y.t().reshape(-1)[:math.ceil(len(x) * up / down)]


def write_wav(path, x):
    """float tensor/array in [-1, 1] -> 16-bit PCM mono WAV at 16 kHz."""
    pcm = (np.clip(np.asarray(x), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setparams((1, 2, SR, len(pcm), "NONE", "not compressed"))
        w.writeframes(pcm.tobytes())


def wav_duration(path):
    _, _, rate, frames, _ = open_wav(path, header_only=True)  # the header only: cheap for every file
    return frames / rate


# -----------------------------------------------------------------------------
# features: 80-bin log-mel, per-utterance normalisation, SpecAugment

def mel_filterbank():
    """(201, 80) triangular filters on the HTK mel scale, unnormalised (the seed's torchaudio
    MelSpectrogram). The lowest few fall between FFT bins and stay empty; normalize() maps them to 0."""
    freqs = torch.linspace(0, SR / 2, N_FFT // 2 + 1)[:, None]  # (201, 1)
    mels = torch.linspace(0, 2595 * math.log10(1 + SR / 2 / 700), N_MELS + 2)  # HTK: 2595 log10(1 + f / 700)
    edges = 700 * (10 ** (mels / 2595) - 1)  # band edges in Hz
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    return ((freqs - lo) / (mid - lo)).minimum((hi - freqs) / (hi - mid)).clamp(min=0)


MEL_FB = mel_filterbank()
WINDOW = torch.hann_window(N_FFT)  # periodic Hann, as torch.stft expects


def log_mel(x):
    """(samples,) at 16 kHz -> (frames, 80) log power mel; frames = 1 + samples // 160."""
    spec = torch.stft(x, N_FFT, HOP, window=WINDOW, center=True, pad_mode="reflect", return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2  # (201, frames)
    return torch.log(power.t() @ MEL_FB + 1e-10)


def normalize(feats):
    """Per-utterance mean/variance normalisation per mel bin: loudness and channel cancel out."""
    return (feats - feats.mean(0)) / (feats.std(0, unbiased=False) + 1e-5)


def describe_augment(spec_augment, speed):
    if not spec_augment:
        return "no augmentation"
    return f"speed 1 +- {speed:g}, SpecAugment" if speed else "SpecAugment"


def spec_augment(feats, gen):
    """One frequency mask (<= 27 bins) and one time mask (<= 70 frames and a fifth of the utterance, so short
    ones keep their content), set to 0 = the mean (Park et al. 2019; the seed's F = 27, T = 70, no warping)."""
    T, n_bins = feats.shape
    feats = feats.clone()
    f = int(torch.randint(0, 28, (), generator=gen))
    f0 = int(torch.randint(0, n_bins - f + 1, (), generator=gen))
    feats[:, f0:f0 + f] = 0
    t = int(torch.randint(0, min(70, T // 5) + 1, (), generator=gen))
    t0 = int(torch.randint(0, T - t + 1, (), generator=gen))
    feats[t0:t0 + t] = 0
    return feats


# -----------------------------------------------------------------------------
# data: manifests, vocabulary, length-bucketed batches

def read_manifest(path, flag, bad_rows="skip", fetch_audio=None, log=print):
    """JSONL (NeMo's .json lines too) or CSV/TSV -> ([{"path", "text", "duration"}], rows skipped). Every WAV
    header is read here, so a missing or corrupt file stops the run before it starts."""
    records = common.opt_in("records", flag)  # a user's file: the built-in set never needs records.py
    p = Path(path)
    rows, bad, reasons = records.read_records(p, flag, ("audio_filepath", "text"),
                                              aliases={"path": "audio_filepath"}, bad_rows=bad_rows)
    items = []
    for k, r in enumerate(rows):
        # NFC: the same Devanagari (or accented) text typed two ways becomes the same characters
        text = " ".join(unicodedata.normalize("NFC", str(r["text"])).split())
        if not text:  # only symbols the vocabulary drops ("!!!")
            bad += 1
            reasons.append("a text with no letter or digit")
            continue
        audio = r["audio_filepath"]
        wav = fetch_audio(audio) if fetch_audio else p.parent / audio  # an absolute `audio` stays as it is
        if not wav.is_file():
            raise UserError(f"{flag} {p}: audio file {wav} not found (paths are relative to the manifest's folder)")
        try:
            items.append({"path": str(wav), "text": text, "duration": wav_duration(wav)})
        except TruncatedWav as e:
            if bad_rows == "fail":
                raise UserError(f"{flag} {p}: line {row_lines(p)[k]}: {e} (--bad-rows skip drops such rows)") from None
            log(f"warning: {flag} {p}: {e}; skipped")
            bad += 1
    first = f" (first: {'; '.join(reasons[:records.MAX_REASONS])})" if reasons else ""
    if not items:
        raise UserError(f"{flag} {p}: no utterances (every row needs an audio path and a text){first}")
    if bad:
        log(f"{flag} {p}: {bad} bad rows skipped{first}")
    return items, bad


def row_lines(path):
    """The line of each data row (records.read_records keeps no line numbers)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        if Path(path).suffix.lower() in (".jsonl", ".json"):
            return [i for i, line in enumerate(f, start=1) if line.strip()]
        reader = csv.reader(f, delimiter="\t" if Path(path).suffix.lower() == ".tsv" else ",")
        next(reader, None)  # the header
        return [reader.line_num for row in reader if len(row) > 1 or "".join(row).strip()]


def read_manifests(args):
    """The three manifests (a URL's audio is fetched from beside it) -> [(items, rows skipped)] * 3."""
    urls = {d: getattr(args, d) for d in MANIFESTS if common.is_url(getattr(args, d) or "")}
    common.fetch_data(args, MANIFESTS, print, exts=common.RECORD_EXTS)
    read = []
    for dest in MANIFESTS:
        flag, fetch_audio = f"--{dest.replace('_', '-')}", None
        if dest in urls:  # its audio paths are relative to the manifest's URL
            import urllib.parse
            download = common.opt_in("download", flag + " given as a URL")
            fetch_audio = lambda a: download.fetch(  # noqa: E731
                urllib.parse.urljoin(urls[dest], a), args.download_dir, flag, log=lambda m: None,
                max_bytes=int(args.max_download_mb * 2 ** 20), show_bar=False)
        read.append(read_manifest(getattr(args, dest), flag, args.bad_rows, fetch_audio)
                    if getattr(args, dest) else ([], 0))
    return read


def build_vocab(items):
    return SPECIALS + sorted({c for it in items for c in it["text"]})


def bucket_batches(items, batch, seed, epoch):
    """Length-sorted batches (little padding), the sort key jittered +-10 % and the order shuffled per epoch,
    by (seed, epoch) alone: a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    jitter = 1 + 0.2 * (torch.rand(len(items), generator=g) - 0.5)
    order = sorted(range(len(items)), key=lambda i: items[i]["duration"] * float(jitter[i]))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def make_batch(items, idxs, stoi, augment_gen=None, speed=0.0):
    """utterances idxs -> feats (B, T, 80) zero-padded; feat_len (B,); chars (B, U) PAD-padded; dec_in (B, U+1)
    = <sos> + chars; dec_out (B, U+1) = chars + <eos>; tgt_len (B,). With augment_gen: played 1 +- speed times
    as fast (resampled: tempo and pitch together, Ko et al. 2015), then SpecAugment."""
    feats = []
    for i in idxs:
        x = read_wav(items[i]["path"])
        if augment_gen is not None and speed:  # as if recorded at `rate`; rounded to 100 Hz, the filter stays small
            rate = SR * (1 + speed * (2 * float(torch.rand((), generator=augment_gen)) - 1))
            x = resample(x, int(round(rate, -2)), SR)
        f = normalize(log_mel(x))
        feats.append(f if augment_gen is None else spec_augment(f, augment_gen))
    ids = [[stoi.get(c, UNK) for c in items[i]["text"]] for i in idxs]
    pad = lambda seqs: nn.utils.rnn.pad_sequence(  # noqa: E731
        [torch.tensor(t, dtype=torch.long) for t in seqs], batch_first=True, padding_value=PAD)
    return {"feats": nn.utils.rnn.pad_sequence(feats, batch_first=True),  # zeros after each utterance's frames
            "feat_len": torch.tensor([len(f) for f in feats]), "chars": pad(ids),
            "dec_in": pad([[SOS] + t for t in ids]), "dec_out": pad([t + [EOS] for t in ids]),
            "tgt_len": torch.tensor([len(t) for t in ids])}


def to_device(b, device):
    return {k: v.to(device, non_blocking=True) for k, v in b.items()}


# -----------------------------------------------------------------------------
# built-in data: synthetic "speech" that exercises the whole pipeline and can be learned
#
# Each of 16 letters is a chord of two tones (like telephone DTMF keys, rows 1.33x apart so a speaker's pitch
# shift of up to 6 % never turns one letter into another), 70-110 ms with a short fade and 10-30 ms gaps, so
# doubled letters stay two events; a space is 80-140 ms of silence. Every utterance has its own "speaker"
# (pitch, loudness) and noise at 15-25 dB SNR; the texts are romanised Konkani-like words over those letters.

LETTERS = "aeioudghkmnprstv"
LOW_HZ, HIGH_HZ = [300, 400, 533, 711], [1100, 1467, 1956, 2608]
WORDS = ["konkani", "vaani", "dis", "mhaka", "tum", "kitem", "korta", "ghara", "vetam", "pani",
         "sukh", "dev", "maka", "tuka", "hanv", "ami", "tumi", "gomant", "sorg", "datta", "samudr",
         "pavs", "nadi", "denva", "ratri", "sakar", "mogan", "vhodd", "poddta", "kuddi"]


def synth_utterance(text, rng):
    """text over LETTERS and spaces -> float32 waveform at 16 kHz."""
    shift, gain = rng.uniform(0.94, 1.06), rng.uniform(0.3, 0.9)
    parts = [np.zeros(int(SR * rng.uniform(0.05, 0.2)))]
    for c in text:
        if c == " ":
            parts.append(np.zeros(int(SR * rng.uniform(0.08, 0.14))))
            continue
        k = LETTERS.index(c)
        n = int(SR * rng.uniform(0.07, 0.11))
        t = np.arange(n) / SR
        tone = np.sin(2 * np.pi * LOW_HZ[k // 4] * shift * t) + 0.7 * np.sin(2 * np.pi * HIGH_HZ[k % 4] * shift * t)
        fade = np.minimum(1, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.005 * SR))
        parts += [tone * fade, np.zeros(int(SR * rng.uniform(0.01, 0.03)))]
    parts.append(np.zeros(int(SR * rng.uniform(0.05, 0.2))))
    x = gain * 0.5 * np.concatenate(parts)
    noise_rms = np.sqrt(np.mean(x ** 2)) / 10 ** (rng.uniform(15, 25) / 20)
    return (x + rng.normal(0, noise_rms, len(x))).astype(np.float32)


def synthetic_set(root, n_train, seed, log=print):
    """Write (once) the built-in set's WAVs, then manifests (a set killed half-written is written again)."""
    d = Path(root) / f"asr-synthetic-n{n_train}-s{seed}"
    splits = {"train": n_train, "val": max(20, n_train // 8), "test": max(20, n_train // 8)}
    paths = {s: d / f"{s}.jsonl" for s in splits}
    if all(p.exists() for p in paths.values()):
        return paths
    try:
        (d / "wav").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--synthetic-dir {root}: cannot create {d} ({e.strerror}); pick another folder")
    log(f"writing the built-in speech set ({sum(splits.values())} utterances) to {d} (once)")
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        lines = []
        for i in range(n):
            text = " ".join(rng.choice(WORDS, size=rng.integers(2, 5)))
            x = synth_utterance(text, rng)
            name = f"wav/{split}_{i:05d}.wav"
            write_wav(d / name, x)
            lines.append(json.dumps({"audio_filepath": name, "text": text, "duration": round(len(x) / SR, 3),
                                     "speaker": f"synth{i % 50}"}))
        tmp = paths[split].with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, paths[split])
    return paths


def read_builtin(path):
    """A manifest of synthetic_set -> items, without records.py (a default run does not load it)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [{"path": str(Path(path).parent / r["audio_filepath"]), "text": r["text"],
             "duration": wav_duration(Path(path).parent / r["audio_filepath"])} for r in rows]


# -----------------------------------------------------------------------------
# model: Conv2d subsampling -> Conformer encoder -> CTC head; Transformer decoder

def sinusoids(T, d, device):
    """(T, d) fixed sinusoidal positions (Vaswani et al. 2017), as the seed uses on both sides."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(T, d, device=device)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


class Subsample(nn.Module):
    """x4 in time (and mel): two 3x3 stride-2 convolutions, then a projection to d_model. 32 channels, not
    d_model (ESPnet's): near the seed's 9.4M parameters, with 1/4 the frames and 1/16 the attention memory."""

    def __init__(self, d, channels=32):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, 2), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 2), nn.ReLU())
        self.proj = nn.Linear(channels * (((N_MELS - 1) // 2 - 1) // 2), d)

    def forward(self, x, lengths):  # x (B, T, 80)
        x = self.conv(x[:, None])  # (B, C, T/4, 19)
        B, C, T, Fq = x.shape
        # an unpadded 3-wide stride-2 conv maps L frames to (L - 1) // 2; real frames never see padding
        return self.proj(x.transpose(1, 2).reshape(B, T, C * Fq)), ((lengths - 1) // 2 - 1) // 2


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics count real frames only. `recomputing` is set while gradient
    checkpointing reruns the forward, so the running statistics move once per step."""
    recomputing = False

    def forward(self, x, pad):  # x (B, d, T); pad (B, T) True at padding
        if not self.training:
            return super().forward(x)
        real = (~pad)[:, None].to(torch.float32)  # (B, 1, T)
        n, xf = real.sum(), x.float()
        mean = (xf * real).sum((0, 2)) / n  # (d,)
        var = ((xf - mean[:, None]) ** 2 * real).sum((0, 2)) / n
        if not self.recomputing:
            with torch.no_grad():  # running stats as nn.BatchNorm1d keeps them (unbiased variance)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1).clamp(min=1), self.momentum)
                self.num_batches_tracked += 1
        y = (xf - mean[:, None]) * torch.rsqrt(var[:, None] + self.eps) * self.weight[:, None] + self.bias[:, None]
        return y.to(x.dtype)


class ConvModule(nn.Module):
    """Conformer convolution (Gulati et al. 2020): pointwise, GLU, depthwise k=31, BatchNorm, SiLU, pointwise."""

    def __init__(self, d, kernel, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pw1 = nn.Conv1d(d, 2 * d, 1)
        self.dw = nn.Conv1d(d, d, kernel, padding=kernel // 2, groups=d)
        self.bn = MaskedBatchNorm1d(d)
        self.pw2 = nn.Conv1d(d, d, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, pad):  # x (B, T, d); pad (B, T) True at padding
        x = F.glu(self.pw1(self.norm(x).transpose(1, 2)), dim=1)  # (B, d, T)
        # zero the padding, else the 31-wide kernel carries it into the last real frames (results vary with padding)
        x = self.dw(x.masked_fill(pad[:, None], 0))
        # batch statistics over real frames (the seed's nn.BatchNorm1d also counted padding); they
        # still differ between the micro-batches of one step, as in any BatchNorm model, so with
        # accumulation training-mode gradients match one big batch only approximately
        return self.drop(self.pw2(F.silu(self.bn(x, pad))).transpose(1, 2))


def feed_forward(d, dropout):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(dropout),
                         nn.Linear(4 * d, d), nn.Dropout(dropout))


class ConformerBlock(nn.Module):
    """Macaron block: x + FF/2, + MHSA, + conv, + FF/2, then LayerNorm (Gulati et al. 2020)."""

    def __init__(self, d, heads, kernel, dropout):
        super().__init__()
        self.ff1, self.ff2 = feed_forward(d, dropout), feed_forward(d, dropout)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.attn_drop = nn.Dropout(dropout)
        self.conv = ConvModule(d, kernel, dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x, pad):
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.attn_drop(self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
        x = x + self.conv(x, pad)
        return self.norm(x + 0.5 * self.ff2(x))


class ASRModel(nn.Module):
    def __init__(self, vocab, d, enc_layers, dec_layers, heads=4, kernel=31, dropout=0.1, subsample=4):
        super().__init__()
        self.d, self.grad_checkpointing = d, False
        self.front = Subsample(d) if subsample == 4 else None
        self.input = nn.Linear(N_MELS, d) if subsample == 1 else None  # the seed's front end
        self.encoder = nn.ModuleList(ConformerBlock(d, heads, kernel, dropout) for _ in range(enc_layers))
        self.ctc_head = nn.Linear(d, vocab)
        self.embed = nn.Embedding(vocab, d)
        self.decoder = nn.ModuleList(nn.TransformerDecoderLayer(d, heads, 4 * d, dropout, batch_first=True)
                                     for _ in range(dec_layers))  # post-norm, ReLU (seed)
        self.out = nn.Linear(d, vocab)
        self.drop = nn.Dropout(dropout)

    def forward(self, b, ctc_weight):
        """-> (summed hybrid loss, target tokens (characters + <eos>), CTC log-probs (B, T', V), lengths). Sums,
        divided once by the target tokens of the whole accumulated batch in common.train_step: a padded micro-batch
        weighs by its real tokens. CTC targets are the characters (the seed's <sos>/<eos> there got emitted)."""
        T, U = int(b["feat_len"].max()), int(b["tgt_len"].max())
        enc, enc_len, pad = self.encode(b["feats"][:, :T], b["feat_len"])  # trim this micro-batch's padding
        log_probs = self.ctc_head(enc).float().log_softmax(-1)  # (B, T', V); CTC in fp32
        ctc = F.ctc_loss(log_probs.transpose(0, 1), b["chars"][:, :U], enc_len, b["tgt_len"], blank=BLANK,
                         reduction="sum", zero_infinity=True)  # an utterance too short for its text adds 0
        logits = self.decode(b["dec_in"][:, :U + 1], enc, pad)  # (B, U+1, V)
        target = b["dec_out"][:, :U + 1]
        ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD, reduction="sum")
        return ctc_weight * ctc + (1 - ctc_weight) * ce, (target != PAD).sum(), log_probs, enc_len

    def encode(self, feats, lengths):
        """feats (B, T, 80), lengths (B,) -> enc (B, T', d), lengths (B,), pad mask (B, T')."""
        x, lengths = self.front(feats, lengths) if self.front is not None else (self.input(feats), lengths)
        x = self.drop(x + sinusoids(x.shape[1], self.d, x.device))
        pad = torch.arange(x.shape[1], device=x.device)[None] >= lengths[:, None]
        for block in self.encoder:
            if self.grad_checkpointing and self.training:  # recompute activations in backward
                x = checkpoint(block, x, pad, use_reentrant=False,
                               context_fn=lambda b=block: (contextlib.nullcontext(), recomputing(b)))
            else:
                x = block(x, pad)
        return x, lengths, pad

    def decode(self, tokens, enc, enc_pad):
        """tokens (B, U) starting with <sos> -> logits (B, U, V) for the next character."""
        U = tokens.shape[1]
        x = self.drop(self.embed(tokens) * math.sqrt(self.d) + sinusoids(U, self.d, tokens.device))
        causal = torch.ones(U, U, dtype=torch.bool, device=tokens.device).triu(1)  # True = may not attend
        tgt_pad = tokens == PAD
        for layer in self.decoder:
            x = layer(x, enc, tgt_mask=causal, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=enc_pad)
        return self.out(x)


@contextlib.contextmanager
def recomputing(block):
    """While checkpointing reruns `block`'s forward: BatchNorm's running statistics stay put."""
    bns = [m for m in block.modules() if isinstance(m, MaskedBatchNorm1d)]
    for m in bns:
        m.recomputing = True
    try:
        yield
    finally:
        for m in bns:
            m.recomputing = False


def build_model(shape, vocab, args):
    return ASRModel(vocab, *shape, args["heads"], 31, args["dropout"], args["subsample"])


def loss_fn(model, b, ctc_weight):
    """Summed hybrid loss and the number of target tokens it covers (characters + <eos>). Called
    through the module, so under torchrun DDP's wrapper sees the step and all-reduces the gradients."""
    return model(b, ctc_weight)[:2]


# -----------------------------------------------------------------------------
# main: flags checked, data read, run folder opened, then train()

def check_flags(args, sources):
    """Reject bad flags; fill in the preset's measured defaults ("auto" in args.json) -> (d, enc, dec layers)."""
    for flag, w in (("--decode-ctc-weight", args.decode_ctc_weight), ("--ctc-weight", args.ctc_weight)):
        if w is not None and not 0 <= w <= 1:
            raise UserError(f"{flag} {w}: must be between 0 and 1")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.speed_perturb is not None and not 0 <= args.speed_perturb <= 0.3:
        raise UserError(f"--speed-perturb {args.speed_perturb}: must be between 0 and 0.3 (0.1 plays at 0.9-1.1x)")
    if args.speed_perturb and not args.spec_augment:
        raise UserError(f"--speed-perturb {args.speed_perturb} needs --spec-augment (both draw from the augmentation "
                        "generator); drop --no-spec-augment, or --speed-perturb")
    if args.preset is None:
        args.preset, sources["preset"] = ("tiny" if args.quick else "optimized"), "auto"
    # the preset's measured defaults (the table above the flags), else the seed's; no speed
    # perturbation without SpecAugment (both draw from the augmentation generator)
    for name, table, seed_value in (("speed_perturb", SPEED_PERTURB if args.spec_augment else {}, 0.0),
                                    ("dropout", DROPOUT, 0.1), ("lr", LR, 5e-4), ("ctc_weight", CTC_WEIGHT, 0.3)):
        if getattr(args, name) is None:
            setattr(args, name, table.get(args.preset, seed_value))
            sources[name] = "auto"
    if sources["epochs"] == "default" and (args.quick or args.preset == "minimal"):
        args.epochs, sources["epochs"] = (6, "quick") if args.quick else (MINIMAL_EPOCHS, "auto")
    if args.preset in EFFECTIVE_BATCH and not args.quick and args.grad_accum == "auto":
        args.effective_batch = EFFECTIVE_BATCH[args.preset]
    d, enc, dec = PRESETS[args.preset]
    shape = (args.d_model or d, args.encoder_layers or enc, args.decoder_layers or dec)
    if shape[0] % args.heads:
        raise UserError(f"--d-model {shape[0]} is not a multiple of --heads {args.heads}")
    if (args.val_manifest or args.test_manifest) and not args.train_manifest:
        raise UserError("--val-manifest/--test-manifest need --train-manifest too")
    if args.train_manifest and args.dataset_size:
        raise UserError("--dataset-size is for the built-in set; it does not apply with --train-manifest")
    return shape


def load_data(args, sources):
    """-> (train, val, test) utterances between MIN_SECONDS and --max-duration, a description, what was dropped."""
    if args.train_manifest:
        (train_items, empty), (val_items, e), (test_items, e2) = read_manifests(args)
        empty += e + e2
        if not args.val_manifest:
            if not 0 < args.val_frac < 0.5:
                raise UserError(f"--val-frac {args.val_frac}: must be between 0 and 0.5")
            random.Random(args.seed).shuffle(train_items)
            n_val = max(1, int(len(train_items) * args.val_frac))
            if len(train_items) - n_val < 1:
                raise UserError(f"--train-manifest {args.train_manifest}: too few utterances to hold out "
                                "validation; add data or pass --val-manifest")
            val_items, train_items = train_items[:n_val], train_items[n_val:]
        data_desc = args.train_manifest
    else:
        n = builtin_size(args)
        if args.dataset_size is None:
            args.dataset_size, sources["dataset_size"] = n, "auto"
        paths = synthetic_set(args.synthetic_dir, n, args.seed)
        train_items, val_items, test_items = (read_builtin(paths[s]) for s in ("train", "val", "test"))
        empty, data_desc = 0, f"built-in synthetic speech ({paths['train'].parent})"
    short, long = f"under {MIN_SECONDS:g} s", f"over --max-duration {args.max_duration:g} s"
    dropped = {"bad rows": empty, short: 0, long: 0}
    for items in (train_items, val_items, test_items):
        dropped[short] += sum(it["duration"] < MIN_SECONDS for it in items)
        dropped[long] += sum(it["duration"] > args.max_duration for it in items)
        items[:] = [it for it in items if MIN_SECONDS <= it["duration"] <= args.max_duration]
    if not train_items or not val_items:
        raise UserError(f"--max-duration {args.max_duration}: no {'training' if not train_items else 'validation'} "
                        f"utterance is between {MIN_SECONDS:g} s and that long; raise it")
    return (train_items, val_items, test_items), data_desc, {k: v for k, v in dropped.items() if v}


def asr_extra(state, path):
    extra = state.get("extra") if isinstance(state, dict) else None
    if not isinstance(extra, dict) or "shape" not in extra or "itos" not in extra:
        raise UserError(f"{path} is not a train_asr.py checkpoint; pass a run folder of train_asr.py "
                        "(--out) or one of its checkpoints (--resume)")
    return extra


def oom_advice(argv, args, device):
    """The seed's "try in order" list, as the commands to run next (when batch 1 does not fit)."""
    def cmd(extra):  # argv less the flag (and value) that `extra` sets, then `extra`
        flag, keep, it = extra.split()[0], [], iter(argv)
        for a in it:
            if a.split("=")[0] != flag:
                keep.append(a)
            elif "=" not in a:
                next(it, None)
        return "python train_asr.py " + " ".join(shlex.quote(a) for a in keep + extra.split())
    remedies = [("--precision auto", device.type == "cuda" and args.precision == "fp32"),
                ("--subsample 4", args.subsample == 1), ("--grad-checkpointing", not args.grad_checkpointing),
                ("--preset minimal", args.preset not in ("minimal", "tiny")),
                (f"--max-duration {max(1, int(args.max_duration // 2))}", True)]
    return [cmd(extra) for extra, helps in remedies if helps]


@dataclasses.dataclass
class Run:
    """What main() set up for train() and its helpers."""
    out: Path
    log: object  # log(message): the console and <out>/train.log
    status: dict
    stop: object  # common.stop_requested(stop, out) says why to stop, if anyone asked
    dev: tuple  # (device, amp_dtype, scaler, why) from common.setup_device
    state: dict  # the checkpoint being resumed, or None
    resumed_from: Path
    ranks: object  # common.OneProcess; ddp.Ranks under torchrun
    tb: object = None  # --tensorboard: common.tensorboard's writer, on the main rank


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, sources = common.resolve_settings(parser, argv)
    shape = check_flags(args, sources)
    if args.transcribe or args.eval_only:  # serving a trained run: --out, else the newest one under runs/
        if not (out := args.out or common.newest_run("asr")):
            raise UserError(f"--{'transcribe' if args.transcribe else 'eval-only'}: no run under runs/; pass --out RUN")
        return run_transcribe(args, out) if args.transcribe else run_eval_only(args, sources, Path(out))
    if args.out:  # a bad --out fails before the built-in set is written (63 MB, once)
        common.check_out_writable(args.out)
    items, data_desc, dropped = load_data(args, sources)  # before the run folder is touched

    # device, checkpoint to resume, vocabulary: every user mistake is caught before the run folder is written to
    ranks = common.process_group(args)
    out, dev, state, resumed_from, notes = common.open_run(args, sources)
    common.check_world_size(state, resumed_from, ranks.world)
    model_args = {"heads": args.heads, "dropout": args.dropout, "subsample": args.subsample}
    if state:
        extra = asr_extra(state, resumed_from)
        if extra["shape"] != list(shape) or extra["model_args"] != model_args:
            raise UserError(f"{resumed_from} is a model of shape {extra['shape']} {extra['model_args']}, these flags "
                            f"ask for {list(shape)} {model_args}; use the run's flags, a new --out or --no-resume")
    # the vocabulary comes from the training transcripts (or the checkpoint, so ids never shift)
    itos = state["extra"]["itos"] if state else build_vocab(items[0])

    log, status, stop = ranks.start(out, args, "asr", "val_cer", notes, dev[0])
    tb = common.tensorboard(args, out) if ranks.is_main else None
    run = Run(out, log, status, stop, dev, state, resumed_from, ranks, tb)
    with common.recording_failures(out, status) if ranks.is_main else contextlib.nullcontext(), \
            tb or contextlib.nullcontext():  # closing --tensorboard's writer flushes it, however train() ends
        try:
            return train(args, sources, run, items=items, itos=itos, shape=shape, model_args=model_args,
                         data_desc=data_desc, dropped=dropped)
        except Exception as e:  # train_step halves the micro-batch on OOM: this did not fit even at batch 1
            if not common.is_oom(e):
                raise
            advice = oom_advice(argv, args, dev[0])
            for i, line in enumerate(advice, start=1):
                log(f"  {i}. {line}")
            raise UserError(f"out of memory even at batch 1 (utterances up to {args.max_duration:g}s); "
                            f"try the {len(advice)} commands above, in order") from None
        finally:
            ranks.end()


# -----------------------------------------------------------------------------
# train: setup helpers, save and validate at module level, then train() with the loop, then report()

def log_setup(log, args, *, model, shape, data_desc, items, itos, dropped):
    """The data, model and recipe lines; a warning for utterances CTC cannot align. -> parameters."""
    train_items, val_items, test_items = items
    hours = sum(it["duration"] for it in train_items) / 3600
    log(f"data: {data_desc}; {len(train_items)} train ({hours:.2f} h) / {len(val_items)} val / "
        f"{len(test_items)} test utterances; {len(itos)} symbols"
        + ("; dropped: " + ", ".join(f"{n} {why}" for why, n in dropped.items()) if dropped else ""))
    if too_fast := sum(1 for it in train_items if len(it["text"]) > int(it["duration"] * 100) // args.subsample):
        log(f"warning: {too_fast} training utterances have more characters than encoder frames; CTC "
            "cannot align them (they add 0 CTC loss)" + ("; try --subsample 1" if args.subsample > 1 else ""))
    n_params, _ = common.count_params(model)
    enc = sum(p.numel() for p in [*model.encoder.parameters(), *(model.front or model.input).parameters()])
    ctc = sum(p.numel() for p in model.ctc_head.parameters())
    log(f"model: {args.preset} d {shape[0]}, {shape[1]} encoder + {shape[2]} decoder layers, "
        f"subsample x{args.subsample}: {n_params:,} parameters (encoder {enc / 1e6:.2f}M, CTC {ctc / 1e6:.2f}M, "
        f"decoder {(n_params - enc - ctc) / 1e6:.2f}M)")
    log(f"recipe: lr {args.lr:g} ({args.schedule}), {args.epochs} epochs, CTC weight {args.ctc_weight:g}, "
        f"dropout {args.dropout:g}, {describe_augment(args.spec_augment, args.speed_perturb)} "
        "(defaults per preset: docs/real-data.md)")
    return n_params


def build_optimizer(model, args, sources, *, n_train, G, world, device, log):
    """AdamW (seed: lr 5e-4, wd 1e-6), warmup, then cosine or plateau, over epochs of global batches of G. plateau:
    the ReduceLROnPlateau state (factor 0.5, patience 3) that validate() updates and the checkpoint carries."""
    if 0 < n_train % G < world:
        raise UserError(f"--batch-size {G // world} x {world} processes: one batch of each epoch would hold "
                        f"{n_train % G} of {n_train} utterances, too few for every process; use another --batch-size")
    optimizer = common.make_optimizer(model.parameters(), args, lr=args.lr, weight_decay=1e-6,
                                      fused=common.fused_adamw(device))
    steps_per_epoch = math.ceil(n_train / G)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    warmup = min(500, total_steps // 10)
    plateau = {"scale": 1.0, "best": math.inf, "bad": 0}

    def lr_factor(s):
        ramp = min(1.0, (s + 1) / max(1, warmup))
        if args.schedule == "plateau":
            return ramp * plateau["scale"]
        return ramp * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    return optimizer, scheduler, plateau, steps_per_epoch, total_steps


def resume(run, args, sources, *, model, optimizer, scheduler, plateau, aug_gen, chosen, n_train, total_steps):
    """Restore the checkpoint (if any; its position moved to a new global batch when one was typed), drop what
    a killed run logged after it, write args.json.
    -> (step, epoch, pos, best, (wall_s, train_s, samples) of the earlier segments)."""
    state, at = run.state, (0, 0, 0, math.inf)
    before = common.restore_training_state(state, model, optimizer, scheduler, run.dev[2])
    if state:
        at = state["step"], state["epoch"], state["pos"], state["best"]
        plateau.update(state["extra"]["plateau"])  # the optimizer's restored lr already carries it
        aug_gen.set_state(state["extra"]["aug_rng"])
        run.log(f"resumed from {run.resumed_from} (step {at[0]}, " + (
            f"epoch {at[1] + 1}, {at[2]} batches into it)" if at[2] or not at[1] else f"end of epoch {at[1]})"))
        G0, G = state["effective"] * run.ranks.world, chosen["global_batch"]
        if G0 != G:
            per_epoch = (math.ceil(n_train / G0), math.ceil(n_train / G))
            step, pos = common.rebatch(scheduler, at[0], at[2], per_epoch=per_epoch, log=run.log,
                                       total=(args.max_steps or args.epochs * per_epoch[0], total_steps))
            at = step, at[1], pos, at[3]
    if run.ranks.is_main:
        common.truncate_metrics(run.out, at[0])  # records a killed run wrote after its last checkpoint
        common.write_args(run.out, args, sources, chosen)
    return (*at, before)


def log_interval(run, *, step, total_steps, epoch, loss, lr, padding, elapsed, steps, samples):
    mem = common.log_step(run.log, step, total_steps, loss, lr, elapsed=elapsed, steps=steps, items=samples,
                          unit="utterances", device=run.dev[0], tb=run.tb)
    common.append_metrics(run.out, {"step": step, "epoch": epoch + 1, "loss": round(loss, 6), "lr": lr,
                                    "padding": round(padding, 3)})
    common.update_status(run.out, run.status, step=step, epoch=epoch + 1, loss=round(loss, 5),
                         samples_per_s=round(samples / max(1e-9, elapsed), 2),
                         eta_s=round((total_steps - step) * elapsed / steps), **mem)


def save(run, args, *, model, optimizer, scheduler, step, best_now, **plain):
    """A checkpoint at `step` (and best.pt with best_now); plain: the loop's position, figures, the model's identity."""
    ckpt = common.training_state(model, optimizer, scheduler, run.dev[2], step=step, args=dict(vars(args)), **plain)
    path = common.save_checkpoint(run.out, step, ckpt, args.keep, protect=run.resumed_from, best=best_now, log=run.log)
    common.update_status(run.out, run.status, last_checkpoint=str(path.resolve()))


@torch.inference_mode()
def evaluate(model, items, stoi, itos, ctc_weight, device, amp_dtype, batch, ranks=common.OneProcess()):
    """-> loss per target token, greedy-CTC CER, WER, this rank's (reference, hypothesis) pairs. Under torchrun
    each rank decodes its share and the sums are added up, so every rank gets the same figures."""
    model.eval()
    loss_sum, n_tok, refs, hyps = 0.0, 0, [], []
    order = ranks.slice(sorted(range(len(items)), key=lambda i: items[i]["duration"]))
    for k in range(0, len(order), batch):
        idxs = order[k:k + batch]
        b = to_device(make_batch(items, idxs, stoi), device)  # outside autocast: the features stay fp32
        with common.autocast(device, amp_dtype):
            ls, n, log_probs, enc_len = model(b, ctc_weight)
        loss_sum, n_tok = loss_sum + ls.item(), n_tok + int(n)
        refs += [items[i]["text"] for i in idxs]
        hyps += [to_text(h, itos) for h in ctc_greedy(log_probs, enc_len)]
    model.train()
    loss_sum, n_tok = ranks.all(loss_sum, "sum"), ranks.all(n_tok, "sum")
    return loss_sum / max(1, n_tok), *error_rates(refs, hyps, ranks), list(zip(refs, hyps))


def validate(run, args, *, model, items, stoi, itos, amp_dtype, batch, plateau, step, epoch):
    """-> (val loss, CER, the batch that fitted). A batch that fitted in training can fail here (another process
    took the memory, or the cache is fragmented): it is halved, and the size that fitted kept for the next one."""
    (val_loss, cer, wer, pairs), batch = common.evaluate_halving(
        lambda bs: evaluate(model, items, stoi, itos, args.ctc_weight, run.dev[0], amp_dtype, bs, ranks=run.ranks),
        batch, run.dev[0], run.log)
    if args.schedule == "plateau":  # the seed's ReduceLROnPlateau: factor 0.5, patience 3
        plateau.update(best=min(plateau["best"], val_loss), bad=0 if val_loss < plateau["best"] else plateau["bad"] + 1)
        if plateau["bad"] > 3:
            plateau.update(scale=plateau["scale"] * 0.5, bad=0)
            run.log(f"val loss has not improved for 4 evaluations: lr x0.5 (now x{plateau['scale']:g})")
    if run.ranks.is_main:
        common.append_metrics(run.out, {"step": step, "epoch": epoch + 1, "val_loss": round(val_loss, 6),
                                        "val_cer": round(cer, 3), "val_wer": round(wer, 3)}, run.tb)
        ref, hyp = pairs[0]
        run.log(f"step {step}: val loss {val_loss:.4f}, CER {cer:.2f}%, WER {wer:.2f}% (greedy CTC); "
                f"e.g. {ref!r} -> {hyp!r}")
        common.update_status(run.out, run.status, metric=round(cer, 3))
    return val_loss, cer, batch


def train(args, sources, run, *, items, itos, shape, model_args, data_desc, dropped):
    out, log, status, ranks, state = run.out, run.log, run.status, run.ranks, run.state
    device, _, scaler, _ = run.dev
    train_items, val_items, _ = items
    stoi = {c: i for i, c in enumerate(itos)}
    if ranks.is_main:
        (out / "vocab.json").write_text(json.dumps(itos, ensure_ascii=False))
    model = build_model(shape, len(itos), model_args).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    n_params = log_setup(log, args, model=model, shape=shape, data_desc=data_desc, items=items, itos=itos,
                         dropped=dropped)

    # -- fit the machine: micro-batch and precision on the longest utterances (the worst case), the memory plan
    compute_loss = functools.partial(loss_fn, ctc_weight=args.ctc_weight)
    longest = sorted(range(len(train_items)), key=lambda i: -train_items[i]["duration"])
    worst = lambda bs: to_device(make_batch(train_items, (longest * bs)[:bs], stoi), device)  # noqa: E731
    micro_bs, accum, amp_dtype, why = common.fit_batch(model, compute_loss, worst, args, sources, device=device,
                                                       amp_dtype=run.dev[1], prec_why=run.dev[3],
                                                       state=state, log=log, ranks=ranks, unit="utterances")
    # an OOM halving can overshoot an odd effective batch: a resumed run keeps its own, unless a new one was typed
    E = state["effective"] if state and micro_bs * accum == state["micro_bs"] * state["accum"] else micro_bs * accum
    G = E * ranks.world  # the global batch
    optimizer, scheduler, plateau, steps_per_epoch, total_steps = build_optimizer(
        model, args, sources, n_train=len(train_items), G=G, world=ranks.world, device=device, log=log)
    plan = common.memory_plan(args, model, optimizer, compute_loss, worst(micro_bs), device=device, amp_dtype=amp_dtype,
                              world=ranks.world, log=log, worst="the longest utterances")
    if args.plan:
        return common.plan_only(out, status, log)

    # -- resume. SpecAugment draws from its own generator (in the checkpoint), so dropout and masks do not shift
    # each other's random streams; under torchrun it is reseeded from (seed, step, rank), as dropout is
    aug_gen = torch.Generator().manual_seed(args.seed + 1)
    step, epoch, pos, best, (wall_before, train_before, samples_before) = resume(
        run, args, sources, model=model, optimizer=optimizer, scheduler=scheduler, plateau=plateau, aug_gen=aug_gen,
        chosen={"micro_batch": micro_bs, "grad_accum": accum, "effective_batch": E, "world_size": ranks.world,
                "global_batch": G, "precision": args.precision, "device": device.type, "why": why},
        n_train=len(train_items), total_steps=total_steps)
    train_model, no_sync = ranks.wrap(model)  # `model` stays the one we save

    # -- the loop
    if ranks.is_main:
        common.update_status(out, status, state="running", total_steps=total_steps, step=step)
    watch, t_start, samples_seen, start_step, eval_bs = common.memory_watch(args), time.time(), 0, step, micro_bs
    bar = common.progress_bar(total_steps, step) if ranks.is_main else None
    model.train()
    while step < total_steps and (args.max_steps or epoch < args.epochs):
        batches = bucket_batches(train_items, G, args.seed, epoch)  # global batches; this rank trains on its slice
        while pos < steps_per_epoch and step < total_steps:
            if ranks.world > 1:
                ranks.seed_step(args.seed, step)
                aug_gen.manual_seed((args.seed * 1_000_003 + step) * ranks.world + ranks.rank + 1)
            batch = make_batch(train_items, ranks.slice(batches[pos]), stoi,
                               aug_gen if args.spec_augment else None, args.speed_perturb)
            # target tokens (characters + <eos>) of the global batch: DDP's mean gradient is then the 1-process one
            n_global = sum(len(train_items[i]["text"]) + 1 for i in batches[pos])
            padding = 1 - int(batch["feat_len"].sum()) / batch["feats"].shape[:2].numel()  # share of padded frames
            batch = to_device(batch, device)
            with plan.measure(batch["feats"].numel()):  # a step with the largest batch yet
                loss, n, micro_bs = common.train_step(
                    train_model, optimizer, scaler, batch, compute_loss, micro_bs, clip=args.clip, device=device,
                    amp_dtype=amp_dtype, log=log, no_sync=no_sync,
                    norm=n_global / ranks.world if ranks.world > 1 else None)
            del batch  # the padded features of this step are not needed in the next one
            micro_bs = int(ranks.all(micro_bs, "min"))  # an OOM halving holds for every rank
            accum = math.ceil(E / micro_bs)
            scheduler.step()
            step, pos, samples_seen = step + 1, pos + 1, samples_seen + len(batches[pos])
            if device.type == "cuda" and args.empty_cache_every and (step - start_step) % args.empty_cache_every == 0:
                # variable-length batches leave differently sized free blocks in the cache; handing
                # them back now and then keeps a long run from dying of fragmentation (seed)
                torch.cuda.empty_cache()
            common.check_memory(watch, device, log)
            if ranks.is_main:
                bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                loss = ranks.all(loss * n, "sum") / n_global if ranks.world > 1 else loss
                if ranks.is_main:
                    log_interval(run, step=step, total_steps=total_steps, epoch=epoch, loss=loss,
                                 lr=scheduler.get_last_lr()[0], padding=padding, elapsed=time.time() - t_start,
                                 steps=step - start_step, samples=samples_seen)
            end_of_epoch, is_best = pos == steps_per_epoch, False
            if (args.eval_every and step % args.eval_every == 0) or end_of_epoch or step == total_steps:
                val_loss, val_cer, eval_bs = validate(run, args, model=model, items=val_items, stoi=stoi, itos=itos,
                                                      amp_dtype=amp_dtype, batch=min(eval_bs, micro_bs),
                                                      plateau=plateau, step=step, epoch=epoch)
                is_best, best = val_loss < best, min(best, val_loss)  # best by validation loss, as the seed
            if end_of_epoch:
                epoch, pos = epoch + 1, 0  # a checkpoint taken now says "start the next epoch"
            stop_why = common.stop_requested(run.stop, out)
            stopping = ranks.all(bool(stop_why), "max")  # every rank stops at the same step
            if step % args.save_every == 0 or end_of_epoch or is_best or step == total_steps or stopping:
                if ranks.is_main:
                    save(run, args, model=model, optimizer=optimizer, scheduler=scheduler, step=step, best_now=is_best,
                         epoch=epoch, pos=pos, best=best, micro_bs=micro_bs, accum=accum, effective=E,
                         world_size=ranks.world, wall_s=wall_before + time.time() - status["started"],
                         train_s=train_before + time.time() - t_start, samples=samples_before + samples_seen,
                         extra={"itos": itos, "shape": list(shape), "model_args": model_args, "plateau": dict(plateau),
                                "aug_rng": aug_gen.get_state(), "preset": args.preset})
                ranks.barrier()  # no rank runs ahead of a checkpoint being written
            if stopping:
                log(f"stopped by {stop_why or 'another rank'} at step {step}; re-run the same command to resume")
                if ranks.is_main:
                    common.update_status(out, status, state="stopped", step=step)
                    bar.close()
                return 0
            if end_of_epoch:
                break
    if not ranks.is_main:
        return 0  # rank 0 alone decodes the test set and writes the summary
    bar.close()

    train_s = train_before + time.time() - t_start
    report(run, args, model=model, items=items, stoi=stoi, itos=itos, amp_dtype=amp_dtype,
           batch=min(eval_bs, micro_bs), new_steps=step - start_step, fields=dict(
               steps=step, epochs=epoch, samples_per_s=round((samples_before + samples_seen) / max(1e-9, train_s), 2),
               params=n_params, wall_s=round(wall_before + time.time() - status["started"], 1), preset=args.preset,
               shape=list(shape), subsample=args.subsample, effective_batch=E, world_size=ranks.world,
               global_batch=G, **plan.figures(run.log)))
    return 0


def report(run, args, *, model, items, stoi, itos, amp_dtype, batch, new_steps, fields):
    """Greedy CTC on val and beam search on test with the best checkpoint (--eval-only: the model given) ->
    summary.json with `fields` (eval.json). new_steps: the steps this process trained (none: a finished run stays)."""
    out, log, status, device = run.out, run.log, run.status, run.dev[0]
    if not new_steps and not args.eval_only and (out / "summary.json").exists():
        return common.finished_before(out, status, fields["steps"], log)
    _, val_items, test_items = items
    if not args.eval_only and (best := out / "checkpoints" / "best.pt").exists():
        model.load_state_dict(common.load_checkpoint(best)["model"])
    greedy = lambda split, b: common.evaluate_halving(  # noqa: E731
        lambda bs: evaluate(model, split, stoi, itos, args.ctc_weight, device, amp_dtype, bs), b, device, log)
    (val_loss, val_cer, val_wer, _), batch = greedy(val_items, batch)
    summary = dict(trainer="asr", metric="val_cer", value=round(val_cer, 3), val_cer=round(val_cer, 3),
                   val_wer=round(val_wer, 3), val_loss=round(val_loss, 5), test_cer=None, test_wer=None,
                   device=device.type, precision=args.precision, **fields)
    if test_items:
        t0 = time.time()
        test_cer, test_wer, pairs = decode_set(model, test_items, itos, args, device)
        (_, greedy_cer, greedy_wer, _), _ = greedy(test_items, batch)
        summary.update(test_cer=round(test_cer, 3), test_wer=round(test_wer, 3),
                       test_cer_greedy_ctc=round(greedy_cer, 3), test_wer_greedy_ctc=round(greedy_wer, 3))
        log(f"test ({len(test_items)} utterances, beam {args.beam}, CTC weight {args.decode_ctc_weight}, "
            f"{time.time() - t0:.0f}s): CER {test_cer:.2f}%, WER {test_wer:.2f}% "
            f"(greedy CTC: CER {greedy_cer:.2f}%, WER {greedy_wer:.2f}%)")
        for ref, hyp in pairs[:3]:
            log(f"  {ref!r} -> {hyp!r}")
    common.write_json_atomic(out / ("eval.json" if args.eval_only else "summary.json"), summary)
    if args.eval_only:
        return log(f"eval-only: val CER {val_cer:.2f}%, WER {val_wer:.2f}% (greedy CTC); {out / 'eval.json'}")
    log(f"done: val CER {val_cer:.2f}%, WER {val_wer:.2f}% (best checkpoint, greedy CTC); {fields['steps']} steps in "
        f"{fields['wall_s']:.0f}s; summary {out / 'summary.json'}")
    common.update_status(out, status, state="finished", step=fields["steps"], metric=round(val_cer, 3), eta_s=0)


# -----------------------------------------------------------------------------
# decode / pretrained (icefall's split): greedy CTC, CTC/attention beam search, CER/WER, --transcribe, --eval-only

def ctc_greedy(log_probs, lengths):
    """(B, T, V) -> id lists: best class per frame, repeats merged, blanks and specials dropped."""
    return [[c for i, c in enumerate(seq[:L]) if c > UNK and (i == 0 or c != seq[i - 1])]
            for seq, L in zip(log_probs.argmax(-1).tolist(), lengths.tolist())]


def ctc_prefix_scores(x, r_n, r_b, last, first):
    """CTC prefix probabilities of every one-character extension of H hypotheses at once (Watanabe et al. 2017,
    Hybrid CTC/attention, alg. 2). x (T, V) frame log-probs; r_n, r_b (T, H): log-prob that frames 0..t emit
    prefix h and end in a non-blank / blank frame; last (H,) the last character of each h; first = h is empty.
    -> r_n', r_b' (T, H, V) for each h+c and log psi (H, V), that the utterance's output starts with h+c."""
    (T, V), H = x.shape, r_n.shape[1]
    # phi: paths into frame t+1 can start c after h; a repeat of h's last char needs a blank between
    phi = torch.logaddexp(r_n, r_b)[:, :, None].expand(T, H, V).clone()
    phi[:, torch.arange(H), last] = r_b
    new_n, new_b = torch.full((2, T, H, V), -math.inf, dtype=x.dtype)
    if first:
        new_n[0] = x[0]
    for t in range(1, T):
        new_n[t] = torch.logaddexp(new_n[t - 1], phi[t - 1]) + x[t]
        new_b[t] = torch.logaddexp(new_n[t - 1], new_b[t - 1]) + x[t, BLANK]
    psi = torch.logsumexp(torch.cat([new_n[:1], phi[:-1] + x[1:, None, :]]), 0)
    return new_n, new_b, psi


@torch.inference_mode()
def beam_search(model, feats, beam, ctc_weight, device):
    """One utterance (T, 80) -> best id list, by beam search on (1 - w) * log p_att + w * log p_ctc(prefix).
    Both parts only fall as a hypothesis grows: the search stops once a finished one beats all live ones."""
    enc, enc_len, _ = model.encode(feats[None].to(device), torch.tensor([len(feats)], device=device))
    x = model.ctc_head(enc)[0].float().log_softmax(-1).cpu()  # (T', V)
    T, V = x.shape
    banned = torch.zeros(V)
    banned[[PAD, BLANK, SOS]] = -math.inf
    # live hypotheses: (ids, score, r_n (T,), r_b (T,), psi); the empty prefix is all blanks
    live = [([SOS], 0.0, torch.full((T,), -math.inf), torch.cumsum(x[:, BLANK], 0), 0.0)]
    done = []
    for step in range(T):
        tokens = torch.tensor([h[0] for h in live], device=device)
        att = model.decode(tokens, enc.expand(len(live), -1, -1), None)[:, -1].float().log_softmax(-1).cpu()
        score = torch.tensor([h[1] for h in live])[:, None] + (1 - ctc_weight) * att + banned
        if ctc_weight > 0:
            r_n, r_b = torch.stack([h[2] for h in live], 1), torch.stack([h[3] for h in live], 1)  # (T, H)
            last = torch.tensor([h[0][-1] if len(h[0]) > 1 else PAD for h in live])
            new_n, new_b, psi = ctc_prefix_scores(x, r_n, r_b, last, first=step == 0)
            psi[:, EOS] = torch.logaddexp(r_n[-1], r_b[-1])  # the output is exactly h
            score = score + ctc_weight * (psi - torch.tensor([h[4] for h in live])[:, None])
        top = score.flatten().topk(min(beam, score.numel()))
        nxt = []
        for s, flat in zip(top.values.tolist(), top.indices.tolist()):
            h, c = divmod(flat, V)
            ids = live[h][0] + [c]
            if c == EOS:
                done.append((s, ids))
            else:  # with its CTC prefix state (none when CTC takes no part)
                ctc = (new_n[:, h, c], new_b[:, h, c], float(psi[h, c])) if ctc_weight > 0 else (None, None, 0.0)
                nxt.append((ids, s, *ctc))
        live = nxt
        if not live or (done and max(d[0] for d in done) >= max(h[1] for h in live)):
            break
    if not done:  # no hypothesis finished within T steps: take the best live one
        done = [(h[1], h[0]) for h in live]
    return [c for c in max(done, key=lambda d: d[0])[1] if c > UNK]


def edit_distance(a, b):
    """Levenshtein distance between two sequences (one DP row)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def error_rates(refs, hyps, ranks=common.OneProcess()):
    """(CER, WER) in % over a corpus (every rank's share under torchrun): edits / reference characters (words)."""
    ce, chars, we, words = (ranks.all(v, "sum") for v in (
        sum(edit_distance(r, h) for r, h in zip(refs, hyps)), sum(len(r) for r in refs),
        sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps)), sum(len(r.split()) for r in refs)))
    return 100 * ce / max(1, chars), 100 * we / max(1, words)


def to_text(ids, itos):
    return "".join(itos[i] for i in ids)


def decode_set(model, items, itos, args, device):
    """Beam search (attention + CTC prefix score) over `items` -> (CER, WER, pairs)."""
    model.eval()
    refs, hyps = [], []
    for it in items:
        feats = normalize(log_mel(read_wav(it["path"])))
        hyps.append(to_text(beam_search(model, feats, args.beam, args.decode_ctc_weight, device), itos))
        refs.append(it["text"])
    model.train()
    return (*error_rates(refs, hyps), list(zip(refs, hyps)))


def load_run(out, args, loaded=None):
    """A run folder's best.pt, else its newest checkpoint, or --resume's (or `loaded`) -> (model, itos, path, step)."""
    state, path = loaded or common.load_run_model(out, "--out", "asr", "extra", resume=args.resume)
    extra = asr_extra(state, path)
    model = build_model(extra["shape"], len(extra["itos"]), extra["model_args"])
    model.load_state_dict(state["model"])
    return model.eval(), extra["itos"], path, state["step"]


def run_transcribe(args, out):
    audio = [read_wav(p) for p in args.transcribe]  # every file checked before the model loads
    for p, x in zip(args.transcribe, audio):
        if len(x) < MIN_SECONDS * SR:
            raise UserError(f"{p}: {len(x) / SR:.3f} s is too short to transcribe (under {MIN_SECONDS:g} s)")
    model, itos, path, step = load_run(out, args)
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model.to(device)
    print(f"model {path} (step {step}) on {device.type}; beam {args.beam}, CTC weight {args.decode_ctc_weight}")
    for p, x in zip(args.transcribe, audio):
        ids = beam_search(model, normalize(log_mel(x)), args.beam, args.decode_ctc_weight, device)
        print(f"{p}\t{to_text(ids, itos)}")
    return 0


def builtin_size(args):
    return args.dataset_size or (800 if args.quick else 3000)


def run_eval_only(args, sources, out):
    """report()'s figures for best.pt (or --resume CKPT) on these flags' data, at its precision and batch; data
    flags that give another split than the training run's are refused (else it would score other utterances)."""
    state, path = loaded = common.load_run_model(out, "--out", "asr", "extra", resume=args.resume)
    was = state["args"]  # its dataset_size is the built-in set's size load_data chose (None with manifests)
    now = dict(vars(args), dataset_size=None if args.train_manifest else builtin_size(args))
    if diff := [f"--{k.replace('_', '-')} {was[k]} (now {now[k]})" for k in DATA_FLAGS if was.get(k, now[k]) != now[k]]:
        raise UserError(f"--eval-only: {path} was trained with {', '.join(diff)}; repeat the training command's "
                        "data flags (--quick included)")
    model, itos, path, step = load_run(out, args, loaded)
    device = common.setup_device(args, sources)[0]
    amp_dtype, _ = common.measure_precision(args, sources, device, model, None, resumed=state["args"]["precision"])
    return report(Run(out, print, None, None, (device,), state, path, common.OneProcess()), args,
                  model=model.to(device), items=load_data(args, sources)[0], stoi={c: i for i, c in enumerate(itos)},
                  itos=itos, amp_dtype=amp_dtype, batch=state["micro_bs"], new_steps=0,
                  fields=dict(checkpoint=str(Path(path).resolve()), step=step))


if __name__ == "__main__":
    common.run_main(main)
