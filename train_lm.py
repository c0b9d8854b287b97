"""train_lm.py -- language-model pretraining: a GPT and a linear-time "eigenstate" recurrent LM.

Byte-level text packed once into memmaps, random windows streamed from disk (RAM stays flat
however big the corpus), AMP + exact gradient accumulation, tokens/s and model-FLOPs utilisation
(MFU) on every log line, validation in bits per byte, DDP with torchrun.

    python train_lm.py --quick --out runs/lm                      # laptop CPU, ~40 s on 2 cores
    python train_lm.py sample --out runs/lm --prompt "The with statement"
    python train_lm.py --quick --out runs/lm --eval-only          # score its best.pt again: eval.json
    python train_lm.py --arch eigen --quick --out runs/lme        # the linear-time eigenstate model
    python train_lm.py --arch eigen --seq-len 32768 --d-model 64 --n-layer 2 --batch-size 1 --max-steps 20 --out e32k
    python train_lm.py prepare --input ~/books/ --out-data data/books        # pack your text once
    python train_lm.py --data data/books --preset small --out runs/books     # one GPU (bf16)
    torchrun --nproc_per_node=8 train_lm.py --data data/books --preset small --out runs/books8  # 8 GPUs
    python train_lm.py --data data/web --preset small_32k --out runs/web32k   # the seed's 32K-context run

Without --data the built-in corpus is used: the English text of Python's own documentation
(`pydoc_data.topics`, shipped with every Python), packed once into data/pydoc.
Re-running the same command resumes from the newest checkpoint in --out.

The eigenstate model is the Temporal Eigenstate Network (Genovo Technologies; public description
in the MIT-labelled paper/ten.tex of github.com/genovotechnologies/temporal-eigenstate-networks),
written here from its math: a diagonal complex linear recurrence of the S4D/LRU family.
"""

import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from common import UserError

# byte-level tokenizer: ids 0..255 are the bytes themselves, then the specials
EOT = 256  # end of text, between documents
SPECIALS = {"<eot>": EOT}
VOCAB = 256 + len(SPECIALS)
DTYPE = np.uint16  # 2 bytes a token on disk: room for 65,536 ids
DEFAULT_DATA = Path("data") / "pydoc"

# Shapes; flags override. Parameter counts are printed at start (they depend on --arch).
PRESETS = {
    "tiny": dict(arch="gpt", n_layer=4, n_head=4, d_model=128, seq_len=256, num_eigenstates=32,
                 chunk_size=64, lr=1e-3),
    # GPT-2 small's shape (124M with GPT-2's 50K vocabulary; ~86M with 257 byte ids)
    "small": dict(arch="gpt", n_layer=12, n_head=12, d_model=768, seq_len=1024, num_eigenstates=64,
                  chunk_size=128, lr=6e-4),
    # the seed's scripts/train_small_32k.sh: d 1024, 8 layers, 128 eigenstates, 32K context,
    # chunk 256, batch 4 x accumulation 4, gradient checkpointing, lr 3e-4
    "small_32k": dict(arch="eigen", n_layer=8, n_head=16, d_model=1024, seq_len=32768, num_eigenstates=128,
                      chunk_size=256, lr=3e-4, batch_size=4, grad_accum=4, grad_checkpointing=True),
}
QUICK_SEQ_LEN, QUICK_STEPS, QUICK_LR = 64, 300, 2e-3

# -----------------------------------------------------------------------------
# config

def add_model_flags(p, seq_len_help=f"the preset's; {QUICK_SEQ_LEN} with --quick"):
    """The model's shape and its optimizer: train_sft.py adds the same flags to its own parser."""
    g = p.add_argument_group("model and optimizer")
    g.add_argument("--preset", choices=list(PRESETS), default="tiny",
                   help="model shape: tiny (CPU demo), small (GPT-2 small's shape), small_32k (the seed's "
                        "eigen model at 32K context)")
    g.add_argument("--arch", choices=["gpt", "eigen"], default=None,
                   help="gpt: pre-LN causal transformer; eigen: linear-time eigenstate recurrence "
                        "(default: the preset's)")
    g.add_argument("--n-layer", type=common.pos_int, default=None, metavar="N", help="blocks (default: the preset's)")
    g.add_argument("--n-head", type=common.pos_int, default=None, metavar="N",
                   help="attention heads, gpt only (default: the preset's)")
    g.add_argument("--d-model", type=common.pos_int, default=None, metavar="D", help="width (default: the preset's)")
    g.add_argument("--seq-len", type=common.pos_int, default=None, metavar="T",
                   help=f"context length in tokens (default: {seq_len_help})")
    g.add_argument("--num-eigenstates", type=common.pos_int, default=None, metavar="K",
                   help="complex eigenstates per cell, eigen only (default: the preset's)")
    g.add_argument("--chunk-size", type=common.pos_int, default=None, metavar="C",
                   help="eigen: tokens per chunk of the chunk-parallel scan (default: the preset's)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay, on 2-D weights only")
    g.add_argument("--schedule", choices=["cosine", "onecycle"], default="cosine",
                   help="learning rate over the run. cosine: linear warmup over --warmup-steps, then cosine from "
                        "--lr down to lr/10 at the last step (nanoGPT's recipe; it beat onecycle at nanoGPT's CPU "
                        "shape, docs/real-data.md). onecycle: warmup over a tenth of the steps, then cosine down to "
                        "zero (what train_sft.py's accuracy bars were measured with)")
    g.add_argument("--warmup-steps", type=common.nonneg_int, default=100, metavar="N",
                   help="cosine: steps of linear warmup, at most a tenth of the run (so a short run still decays)")
    g.add_argument("--beta2", type=float, default=0.99,
                   help="AdamW beta2. 0.99 averages squared gradients over ~100 steps: steadier steps for small, "
                        "noisy batches (nanoGPT's shakespeare_char); 0.95 is the GPT-2-sized-batch value "
                        "(train_sft.py's)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (first steps are slow)")


parser = common.make_parser(__doc__, trainer="lm", epochs=1, lr=None, effective_batch=32,
                            save_every=100, eval_every=100, log_every=10)
g = parser.add_argument_group("language model")
g.add_argument("--data", default=None, metavar="DIR|URL",
               help=f"a folder made by `train_lm.py prepare`, or the http(s) URL of a UTF-8 text file "
                    f"(fetched and packed once) (default: the built-in corpus, packed into {DEFAULT_DATA} on "
                    f"first use)")
g.add_argument("--eval-tokens", type=common.pos_int, default=65536, metavar="N",
               help="validation tokens scored at each evaluation (fixed windows from the start of val.bin)")
add_model_flags(parser)
# instruction fine-tuning moved to train_sft.py: its spellings here get one line naming the new command
MOVED_TO_SFT = ("--task", "--init-from", "--mac", "--cpu-only", "--continuous-learning", "--feedback-db",
                "--download-data", "--retrain-threshold", "--replay", "--round-epochs", "--poll-every", "--max-rounds")


def prepare_parser():
    p = common.Parser(prog="train_lm.py prepare", allow_abbrev=False, formatter_class=common.HelpFormat,
                      description="tokenize text files once (bytes + <eot> between documents) and pack "
                                  "them into train.bin / val.bin memmaps with meta.json")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="text files and/or folders (searched recursively; each file is one document)")
    p.add_argument("--out-data", required=True, metavar="DIR", help="folder to write (must not hold a corpus yet)")
    p.add_argument("--val-frac", type=float, default=0.1, help="share of tokens at the end held out for validation")
    return p


# -----------------------------------------------------------------------------
# data: bytes -> one uint16 stream -> train.bin / val.bin memmaps + meta.json

def encode(text):
    return list(text.encode("utf-8"))


def decode(ids):
    """Bytes back to text; <eot> becomes a blank line, a cut multi-byte character becomes U+FFFD."""
    out, buf = [], bytearray()
    for i in ids:
        if i < 256:
            buf.append(int(i))
        else:
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
    out.append(buf.decode("utf-8", errors="replace"))
    return "\n\n".join(out)


def find_documents(inputs):
    """Text files under the inputs, in a stable order; files with NUL bytes (binaries) skipped."""
    docs, skipped = [], []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise UserError(f"--input {raw}: no such file or folder")
        # hidden folders and files (.git, .venv, .DS_Store) are not the user's text
        files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(p).parts)) if p.is_dir() else [p]
        for f in files:
            if f.stat().st_size == 0:
                continue  # an empty file would only add a second <eot>
            with open(f, "rb") as fh:
                head = fh.read(8192)
            (skipped if b"\0" in head else docs).append(f)
    return docs, skipped


def write_corpus(out_dir, docs, val_frac, sources):
    """Pack documents (callables returning bytes, or Paths) into out_dir with <eot> between them.

    Byte tokenization is a copy, so a file's token count is its size: the memmaps are sized first and filled one
    document at a time, and RAM never holds more than one document. The split is by position: the last val_frac of the
    token stream is validation. Written into a temporary folder and renamed, so a half-written corpus is never used."""
    out_dir = Path(out_dir)
    sizes = [d.stat().st_size if isinstance(d, Path) else len(d()) for d in docs]
    total = sum(sizes) + len(docs) - 1
    n_val = int(total * val_frac)
    n_train = total - n_val
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:  # a failure or Ctrl-C leaves no half-written temporary folder behind
        stream = np.memmap(tmp / "all.bin", dtype=DTYPE, mode="w+", shape=(total,))
        pos = 0
        for i, (d, size) in enumerate(zip(docs, sizes)):
            data = d.read_bytes() if isinstance(d, Path) else d()
            if len(data) != size:
                raise UserError(f"--input: {d} changed size while it was read ({size} -> {len(data)} bytes); "
                                "run prepare again when nothing writes to it")
            stream[pos:pos + len(data)] = np.frombuffer(data, dtype=np.uint8)
            pos += len(data)
            if i < len(docs) - 1:
                stream[pos] = EOT
                pos += 1
        for name, lo, hi in (("train.bin", 0, n_train), ("val.bin", n_train, total)):
            part = np.memmap(tmp / name, dtype=DTYPE, mode="w+", shape=(hi - lo,))
            for a in range(lo, hi, 1 << 24):  # 32 MB at a time: RAM stays flat for any corpus size
                part[a - lo:min(hi, a + (1 << 24)) - lo] = stream[a:min(hi, a + (1 << 24))]
            part.flush()
            del part
        del stream
        (tmp / "all.bin").unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    meta = {"tokenizer": "bytes", "vocab_size": VOCAB, "specials": SPECIALS, "dtype": np.dtype(DTYPE).name,
            "train_tokens": n_train, "val_tokens": n_val, "val_frac": val_frac, "documents": len(docs),
            "sources": sources}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another process (a DDP rank) finished the same corpus first
        shutil.rmtree(tmp)
    return meta


def run_prepare(argv):
    args = prepare_parser().parse_args(argv)
    if not 0 < args.val_frac < 0.5:
        raise UserError(f"--val-frac {args.val_frac}: must be between 0 and 0.5")
    out = Path(args.out_data)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-data {out}: is a file; give a new folder name")
    if (out / "meta.json").exists() or (out.exists() and any(out.iterdir())):
        raise UserError(f"--out-data {out}: already exists and is not empty; pick a new folder")
    try:
        common.check_out_writable(out)
    except UserError as e:  # its message names --out; here the flag is --out-data
        raise UserError(str(e).replace("--out", "--out-data")) from None
    docs, skipped = find_documents(args.input)
    if not docs:
        raise UserError(f"--input {' '.join(args.input)}: no text files found")
    if sum(d.stat().st_size for d in docs) < 1000:
        raise UserError(f"--input: only {sum(d.stat().st_size for d in docs)} bytes of text; need at least 1000")
    if out.exists():
        out.rmdir()  # empty: checked above; recreated by the rename
    t0 = time.time()
    meta = write_corpus(out, docs, args.val_frac, [str(Path(a).expanduser().resolve()) for a in args.input])
    print(f"packed {meta['documents']} documents ({len(skipped)} binary files skipped) into {out}: "
          f"{meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens in {time.time() - t0:.1f}s")
    if skipped:  # NUL bytes: binaries, and also UTF-16 text (save it as UTF-8 to include it)
        print("skipped (NUL bytes: binary or UTF-16): " + ", ".join(map(str, skipped[:10]))
              + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    if meta["val_tokens"] < 1025:
        print(f"warning: validation holds only {meta['val_tokens']:,} tokens; training needs --seq-len below "
              "that (raise --val-frac or add text for longer contexts)")
    return 0


def builtin_corpus(log):
    """Python's documentation topics, packed into data/pydoc on first use (about 470 KB)."""
    if not (DEFAULT_DATA / "meta.json").exists():
        from pydoc_data.topics import topics
        docs = [lambda k=k: topics[k].encode("utf-8") for k in sorted(topics)]
        common.check_out_writable(DEFAULT_DATA)
        write_corpus(DEFAULT_DATA, docs, 0.1, ["pydoc_data.topics"])
        log(f"built-in corpus: Python's documentation topics (pydoc_data.topics) packed into {DEFAULT_DATA}")
    return DEFAULT_DATA


def load_meta(data_dir, seq_len):
    """meta.json of a prepared folder, checked against the files; every problem is a UserError."""
    d = Path(data_dir)
    if d.is_file():
        raise UserError(f"--data {d}: is a file; pass the folder that holds meta.json, train.bin and val.bin")
    if not d.is_dir():
        raise UserError(f"--data {d}: no such folder; make one with `python train_lm.py prepare "
                        f"--input FILES --out-data {d}`")
    try:
        meta = json.loads((d / "meta.json").read_text())
        for k in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens"):
            meta[k]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--data {d}: no readable meta.json ({type(e).__name__}); is it a folder made by "
                        "`train_lm.py prepare`?")
    for k in ("vocab_size", "train_tokens", "val_tokens"):
        if type(meta[k]) is not int or meta[k] < 0:
            raise UserError(f"--data {d}: meta.json's {k} is {meta[k]!r}, not a token count; re-run prepare")
    if meta["vocab_size"] != VOCAB:
        raise UserError(f"--data {d}: meta.json says vocab_size {meta['vocab_size']}; the byte tokenizer has "
                        f"{VOCAB} ids (re-run prepare)")
    if meta["tokenizer"] != "bytes" or meta["dtype"] != np.dtype(DTYPE).name:
        raise UserError(f"--data {d}: tokenizer {meta['tokenizer']!r} / dtype {meta['dtype']!r}; this trainer "
                        "reads bytes / uint16 (re-run prepare)")
    for name, key in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")):
        f = d / name
        if not f.is_file() or f.stat().st_size != meta[key] * np.dtype(DTYPE).itemsize:
            raise UserError(f"--data {d}: {name} is missing or not {meta[key]:,} tokens long as meta.json says; "
                            "re-run prepare")
        if meta[key] < seq_len + 1:
            raise UserError(f"--data {d}: {name} holds {meta[key]:,} tokens, fewer than --seq-len {seq_len} + 1; "
                            "use a smaller --seq-len or more text")
    return meta


def get_batch(path, n_tokens, seq_len, seed, step, global_batch, rank, per_rank):
    """This rank's windows of step `step`: (per_rank, seq_len + 1) int64 token ids.

    The start positions of the whole global batch depend only on (seed, step), and rank r reads its slice of them: a
    resumed run draws the same windows (no sampler state to save), and N ranks see exactly the windows one process would
    at the same global batch. A fresh memmap per batch, as nanoGPT does: pages read through a long-lived mapping would
    stay in this process's RSS, so a big corpus would look like a memory leak."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, n_tokens - seq_len, size=global_batch)[rank * per_rank:(rank + 1) * per_rank]
    mm = np.memmap(path, dtype=DTYPE, mode="r")
    x = np.stack([mm[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    del mm
    return {"x": torch.from_numpy(x)}  # (B, T + 1): inputs x[:, :-1], targets x[:, 1:]


def val_windows(path, n_tokens, seq_len, max_tokens):
    """Fixed, non-overlapping validation windows from the start of val.bin (the same every eval)."""
    n = max(1, min((n_tokens - 1) // seq_len, max_tokens // seq_len))
    mm = np.memmap(path, dtype=DTYPE, mode="r")
    x = np.stack([mm[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int64)
    del mm
    return torch.from_numpy(x)


# -----------------------------------------------------------------------------
# model: GPT

class CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)  # one matmul for q, k and v
        self.proj = nn.Linear(d, d)
        self.proj.residual = True

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, hs)
        # fused kernel (flash / memory-efficient where available): never materialises (T, T) scores
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.proj.residual = True

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # exact GELU: on CPU faster than the tanh form


# -----------------------------------------------------------------------------
# model: the eigenstate recurrence
#
# Per eigenstate k: lambda_k = |lambda_k| e^{i omega_k} with |lambda_k| = 0.1 + 0.89 sigmoid(alpha_k),
# and c_t = lambda_k c_{t-1} + beta_t (beta real), so with lag n = j - s inside a chunk,
#     c_{t0+j} = sum_{s<=j} lambda^{j-s} beta_{t0+s}  +  lambda^{j+1} c_{t0-1}.
# The first sum is a (C x C) lower-triangular matrix per eigenstate times the chunk's inputs
# (a batched matmul over K); the second carries the state into the chunk. Both are exact, so the
# chunked form equals the sequential scan (tested), costs O(T C K) and keeps O(T K) for backward.

def eigen_scan_reference(beta, mag, omega):
    """Re(c_t) by the plain sequential scan. beta (B, T, K) real; mag, omega (K,). For the tests."""
    B, T, K = beta.shape
    a = beta.new_zeros(B, K)  # Re c
    b = beta.new_zeros(B, K)  # Im c
    cos, sin = torch.cos(omega), torch.sin(omega)
    out = []
    for t in range(T):
        a, b = mag * (a * cos - b * sin) + beta[:, t], mag * (a * sin + b * cos)
        out.append(a)
    return torch.stack(out, 1)


def eigen_scan_chunked(beta, mag, omega, chunk):
    """Re(c_t) chunk-parallel; the same numbers as eigen_scan_reference. beta (B, T, K) -> (B, T, K).

    A T that chunk does not divide is padded with zero inputs at the end: the scan is causal, so padding after the last
    token changes nothing before it; the padded outputs are cut off. Laid out eigenstate-first, (K, C, B n): the
    in-chunk sums are then one plain bmm with K as its batch ((C x C) @ (C x B n) each), which runs at matmul speed; an
    einsum over the (B, n, C, K) layout fell into a strided bmm ~100x slower at 16K tokens."""
    B, T, K = beta.shape
    C = min(chunk, T)
    n = -(-T // C)
    x = F.pad(beta, (0, 0, 0, n * C - T)).view(B, n, C, K).permute(3, 2, 0, 1).reshape(K, C, B * n)  # (K, C, B n)
    lag = torch.arange(C, device=beta.device, dtype=beta.dtype)
    d = lag[:, None] - lag[None, :]  # (C, C): lag j - s
    log_mag, w = torch.log(mag)[:, None, None], omega[:, None, None]  # (K, 1, 1)
    # |lambda|^n as exp(n log|lambda|): no overflow, 0.1^255 just underflows to 0
    decay = torch.exp(d.clamp(min=0) * log_mag) * (d >= 0)  # (K, C, C), zero above the diagonal
    y = torch.bmm(decay * torch.cos(d * w), x)  # (K, C, B n): Re of the in-chunk sums
    # the chunk's own contribution to its last state, real and imaginary
    last_re = y[:, -1].view(K, B, n)
    last_im = torch.bmm((decay[:, -1] * torch.sin(d[-1] * w[:, 0]))[:, None], x).view(K, B, n)
    # carry across chunks: h_n = last_n + lambda^C h_{n-1} (n steps of (K, B); no detach, so
    # gradients flow through every chunk boundary). unbind, not last_re[:, :, i]: each select's
    # backward writes a zero-filled (K, B, n) gradient and autograd sums the n of them, O(n^2):
    # a 32K step took 9.0x a 4K one, 7.6x with unbind, whose backward is one stack (docs/lm.md).
    magC, angC = torch.exp(C * log_mag[:, 0]), C * w[:, 0]  # (K, 1)
    pc_re, pc_im = magC * torch.cos(angC), magC * torch.sin(angC)
    h_re, h_im = beta.new_zeros(K, B), beta.new_zeros(K, B)
    prev_re, prev_im = [], []
    for l_re, l_im in zip(last_re.unbind(2), last_im.unbind(2)):  # (K, B) each
        prev_re.append(h_re)
        prev_im.append(h_im)
        h_re, h_im = l_re + pc_re * h_re - pc_im * h_im, l_im + pc_re * h_im + pc_im * h_re
    prev_re = torch.stack(prev_re, 2).view(K, 1, B * n)  # (K, 1, B n): the state before each chunk
    prev_im = torch.stack(prev_im, 2).view(K, 1, B * n)
    # Re(lambda^{j+1} h) for j = 0..C-1
    p = lag + 1  # (C,)
    pmag = torch.exp(p * log_mag[:, 0])  # (K, C)
    p_re, p_im = pmag * torch.cos(p * w[:, 0]), pmag * torch.sin(p * w[:, 0])
    y = y + p_re[:, :, None] * prev_re - p_im[:, :, None] * prev_im  # (K, C, B n)
    return y.view(K, C, B, n).permute(2, 3, 1, 0).reshape(B, n * C, K)[:, :T]


class EigenMixer(nn.Module):
    """Two eigenstate cells, averaged: y_t = mean_cells W_out Re(c_t), c_t = lambda c_{t-1} + W_in x_t.

    Both cells are stored as one bank of 2K eigenstates (cell i owns rows i*K..i*K+K-1): one W_in (d -> 2K) and one
    scan; 0.5 * W_out [Re c_1; Re c_2] with W_out (2K -> d) is exactly the average of the two cells' W_out Re(c). The
    seed's resonance coupling and dropout are left out."""

    def __init__(self, d, K, chunk, cells=2):
        super().__init__()
        self.chunk, self.cells = chunk, cells
        self.w_in = nn.Linear(d, cells * K, bias=False)
        self.w_out = nn.Linear(cells * K, d, bias=False)
        self.w_out.residual = True
        self.alpha = nn.Parameter(torch.empty(cells * K))  # raw decay: |lambda| = 0.1 + 0.89 sigmoid(alpha)
        self.omega = nn.Parameter(torch.empty(cells * K))  # rotation per step, learnable
        self.reset_eigen()

    def reset_eigen(self):
        K = self.alpha.numel() // self.cells
        with torch.no_grad():
            self.alpha.uniform_(-3.0, 0.0)  # |lambda| in about 0.14..0.55 at init (the seed's)
            self.omega.copy_((2 * math.pi * torch.arange(K) / K).repeat(self.cells))

    def forward(self, x):  # (B, T, C)
        beta = self.w_in(x)  # (B, T, 2K)
        # the scan in fp32 even under autocast: decay powers span 0.1^C .. 1
        with torch.autocast(x.device.type, enabled=False):
            mag = 0.1 + 0.89 * torch.sigmoid(self.alpha)  # |lambda| in (0.1, 0.99)
            re = eigen_scan_chunked(beta.float(), mag.float(), self.omega.float(), self.chunk)
        return self.w_out(re.to(beta.dtype)) / self.cells


class Block(nn.Module):
    """Pre-norm residual block (x + mix(LN x), then x + MLP(LN x)) for both archs: pre-norm keeps
    deep stacks stable without warmup tricks (the seed's eigen block was post-norm; we chose one)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = (CausalSelfAttention(d, cfg["n_head"]) if cfg["arch"] == "gpt"
                    else EigenMixer(d, cfg["num_eigenstates"], cfg["chunk_size"]))
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.mix(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class LM(nn.Module):
    """Token + learned position embeddings -> blocks -> LayerNorm -> tied head (logits)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg["d_model"]
        self.wte = nn.Embedding(cfg["vocab_size"], d)
        self.wpe = nn.Embedding(cfg["seq_len"], d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg["vocab_size"], bias=False)
        self.head.weight = self.wte.weight  # tied: the input and output embedding are one matrix
        self.grad_checkpointing = False
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                # GPT-2: N(0, 0.02), residual projections scaled by 1/sqrt(2 layers) so the
                # residual stream's variance does not grow with depth
                std = 0.02 / math.sqrt(2 * cfg["n_layer"]) if getattr(m, "residual", False) else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, EigenMixer):
                m.reset_eigen()

    def forward(self, idx):  # (B, T) -> logits (B, T, V)
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for block in self.blocks:
            # recompute each block's activations in backward instead of keeping them
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and self.training else block(x)
        return self.head(self.ln_f(x))


def model_config(args, vocab):
    return {"arch": args.arch, "vocab_size": vocab, "n_layer": args.n_layer, "n_head": args.n_head,
            "d_model": args.d_model, "seq_len": args.seq_len, "num_eigenstates": args.num_eigenstates,
            "chunk_size": args.chunk_size}


def param_count(cfg):
    """Parameters of LM(cfg), counted from the shape without building it: a 32K position table alone is 33M weights.
    (Building it on the meta device ran its init ops through torch's Python decompositions, which import dynamo and
    sympy: 3.5 s and 70 MB of RSS before the model existed; the optimizer's first step imports them too, but `sample`
    and the preset table need no optimizer.) tests/test_lm.py checks it against LM(cfg) for both archs."""
    V, T, d, L = cfg["vocab_size"], cfg["seq_len"], cfg["d_model"], cfg["n_layer"]
    if cfg["arch"] == "gpt":
        mix = (d * 3 * d + 3 * d) + (d * d + d)  # qkv and proj, with biases
    else:
        K2 = 2 * cfg["num_eigenstates"]  # two cells
        mix = 2 * d * K2 + 2 * K2  # w_in, w_out; alpha and omega
    block = 4 * d + mix + (d * 4 * d + 4 * d) + (4 * d * d + d)  # two LayerNorms, mixer, MLP
    return V * d + T * d + L * block + 2 * d  # the head is tied to the token embedding


def flops_per_token(cfg):
    """Model FLOPs per trained token (forward + backward = 3 x forward, 2 FLOPs a multiply-add).

    6 N for the weight matmuls, N without the position table (a lookup, no matmul; the tied token embedding counts once,
    as the head). GPT adds attention: 12 L d T, the PaLM paper's convention (QK^T and AV, forward and backward, counted
    as if not causal). Eigen adds its scan: per layer and eigenstate, the in-chunk matmul is C multiply-adds per token
    (we count the dense C x C matrix, zeros above the diagonal included: the machine does that work), plus ~4 for the
    carried state: 6 L (2K) (C + 4). W_in, W_out and the FFN are in 6 N."""
    n = param_count(cfg) - cfg["seq_len"] * cfg["d_model"]
    L, d, T = cfg["n_layer"], cfg["d_model"], cfg["seq_len"]
    if cfg["arch"] == "gpt":
        return 6 * n + 12 * L * d * T
    C = min(cfg["chunk_size"], T)
    return 6 * n + 6 * L * 2 * cfg["num_eigenstates"] * (C + 4)


def loss_fn(model, mb, device):
    """Cross-entropy summed over the micro-batch's tokens, and their count: common.train_step
    divides by the tokens of the whole accumulated batch, so accumulation is exact."""
    x = mb["x"].to(device, non_blocking=True)
    logits = model(x[:, :-1])  # (B, T, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
    return loss, x[:, 1:].numel()


@torch.inference_mode()
def evaluate(model, windows, device, amp_dtype, bs):
    """Validation loss in nats per token, and bits per byte (byte tokens: nats / ln 2; the <eot>
    separators, about 0.02 % of tokens on the built-in corpus, are counted as bytes)."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), bs):
        with common.autocast(device, amp_dtype):
            loss, k = loss_fn(model, {"x": windows[i:i + bs]}, device)
        total, n = total + loss.item(), n + k
    model.train()
    return total / n, total / n / math.log(2)


# -----------------------------------------------------------------------------
# device peak FLOP/s, for MFU

# dense tensor-core peaks from NVIDIA's datasheets, TFLOP/s: (bf16/fp16, fp32 via TF32, plain fp32)
GPU_PEAK_TFLOPS = {"H100 PCIe": (756, 378, 51), "H100": (989, 494, 67), "H200": (989, 494, 67),
                   "A100": (312, 156, 19.5), "A10G": (70, 35, 31.2), "A10": (125, 62.5, 31.2),
                   "L40S": (362, 183, 91.6), "L40": (181, 90.5, 90.5), "L4": (121, 60, 30.3), "T4": (65, 8.1, 8.1),
                   "V100": (125, 15.7, 15.7), "RTX 4090": (165, 82.6, 82.6), "RTX 3090": (71, 35.6, 35.6)}


def matmul_peak(device, dtype, seconds=2.0):
    """Best FLOP/s of square matmuls on this device (sizes 256 and 512 on a CPU, 2048 and 4096 on a GPU), repeated over
    about `seconds`: the denominator of MFU. A one-second reading of one size swings 3x between runs on a busy
    machine (other load, clock boost); the best of many repeats at a few sizes is what the hardware can do, and it is
    stable. On a CPU, 512 reads as high as 1024 (101 vs 98 GFLOP/s, 1 thread; 73 vs 68, 2 threads); with the products
    preallocated it adds 3.6 MB of RSS, where 256..1024 with a fresh product per call added 19.6 (docs/lm.md)."""
    sizes = (2048, 4096) if device.type == "cuda" else (256, 512)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mats = {n: [torch.randn(n, n, device=device, dtype=dtype) for _ in range(3)] for n in sizes}  # a, b, a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for n, (a, b, c) in mats.items():
            reps = max(1, int(2e9 // (2 * n ** 3)))  # about 2 GFLOP per timing: long enough to time
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b, out=c)
            sync()
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def cpu_name():
    """The CPU's model name, as `memory_optimizer.py config` records it beside the peak it measured:
    /proc/cpuinfo's 'model name' (platform.processor() says only 'x86_64' on Linux), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_peak(device, amp_dtype, config, out):
    """(FLOP/s, where it came from), MFU's denominator: the datasheet for known GPUs; else the
    matmul peak `memory_optimizer.py config` measured into optimal_config.json (best of many
    repeats at three sizes) when it was measured on this machine at this thread count; else
    measured here for 3 s and cached in <out>/peak_flops.json (a resumed run reuses it)."""
    dtype = "bf16" if amp_dtype is not None else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32, fp32) in GPU_PEAK_TFLOPS.items():
            if key in name:
                tflops = half if amp_dtype is not None else tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
                return tflops * 1e12, f"{name} datasheet, {tflops:g} TFLOP/s"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    threads = torch.get_num_threads()
    try:
        prof = json.loads(Path(config).read_text())["machine"]
        peak = prof["matmul_peak"]
        if (prof["gpu_name"] if device.type == "cuda" else prof["cpu_model"]) == machine and \
                peak["device"] == device.type and peak["threads"] == threads:
            return peak[f"{dtype}_gflops"] * 1e9, (f"{dtype} matmul peak {peak[f'{dtype}_gflops']:,.0f} GFLOP/s "
                                                  f"from {config} ({threads} thread{'s' * (threads != 1)})")
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no config, or one from before it held the peak: measure
    key = f"{device.type} {machine}, {threads} thread{'s' * (threads != 1)}, {dtype}"
    cache = Path(out) / "peak_flops.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["key"] == key:
            return cached["flops"], f"measured {cached['flops'] / 1e9:.0f} GFLOP/s matmul peak ({key}; cached)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    flops = matmul_peak(device, amp_dtype or torch.float32, seconds=3.0)
    common.write_json_atomic(cache, {"key": key, "flops": flops})
    return flops, (f"measured {flops / 1e9:.0f} GFLOP/s matmul peak ({key}; `python memory_optimizer.py config` "
                   "measures it once, for every run)")


def checked_peak(peak, fpt, tps, world, device, amp_dtype, log):
    """The peak again, when MFU would read over 100 %: the peak was read low (a busy machine while
    it was measured). Re-measured now, and never below what this run just did, so MFU <= 100 %."""
    if fpt * tps / (peak * world) <= 1:
        return peak
    new = max(peak, matmul_peak(device, amp_dtype or torch.float32, seconds=3.0), fpt * tps / world)
    log(f"warning: MFU would read {100 * fpt * tps / (peak * world):.0f} %, so the matmul peak was measured "
        f"again: {new / 1e9:,.0f} GFLOP/s (was {peak / 1e9:,.0f}; `python memory_optimizer.py config` on an idle "
        "machine measures it best)")
    return new


# -----------------------------------------------------------------------------
# main: flags -> data -> run folder -> train

def resolve_shape(args, sources, log):
    """Preset values under the flags; --quick shortens the context. Logged, recorded in args.json."""
    preset = PRESETS[args.preset]
    for key in ("arch", "n_layer", "n_head", "d_model", "seq_len", "num_eigenstates", "chunk_size"):
        # a preset typed on the command line beats optimal_config.json's seq_len (made for the default preset)
        from_cfg = sources.get(key) == "optimal_config.json" and sources.get("preset") == "flag"
        if getattr(args, key) is None or from_cfg:
            value = preset[key]
            if key == "seq_len" and args.quick and not from_cfg:
                value = QUICK_SEQ_LEN
            if from_cfg:
                log(f"--preset {args.preset}: {key} {value} (not {getattr(args, key)} from the config)")
            setattr(args, key, value)
            sources[key] = "preset"
    for key in ("batch_size", "grad_accum", "grad_checkpointing"):
        if key in preset and sources.get(key) == "default":
            setattr(args, key, preset[key])
            sources[key] = "preset"
    if args.lr is None:
        args.lr, sources["lr"] = (QUICK_LR if args.quick and args.preset == "tiny" else preset["lr"]), "preset"
    if args.arch == "gpt" and args.d_model % args.n_head:
        raise UserError(f"--d-model {args.d_model} is not divisible by --n-head {args.n_head}")
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len}: need at least 2 tokens")


def check_flags(args):
    """Flag values argparse cannot check alone (train_sft.py calls it too)."""
    if not 0 <= args.weight_decay < 1:
        raise UserError(f"--weight-decay {args.weight_decay}: must be in [0, 1)")
    if not 0 < args.beta2 < 1:
        raise UserError(f"--beta2 {args.beta2}: must be in (0, 1), e.g. 0.99")


def check_resume(state, resumed_from, cfg, world, task):
    """A checkpoint resumes only the run it came from: same task, shape and process count."""
    if state is None:
        return
    if not isinstance(state, dict) or "model_cfg" not in state or "world_size" not in state:
        raise UserError(f"{resumed_from} is not a train_lm.py checkpoint; use a new --out or --no-resume")
    if state.get("task", "lm") != task:
        was = "train_sft.py" if state.get("task") == "sft" else "train_lm.py"
        raise UserError(f"{resumed_from} is a {was} run; use a new --out or --no-resume")
    if state["model_cfg"] != cfg:
        diff = ", ".join(f"{k} {state['model_cfg'].get(k)} (now {v})" for k, v in cfg.items()
                         if state["model_cfg"].get(k) != v)
        raise UserError(f"{resumed_from} was trained with {diff}; use the same flags, a new --out or --no-resume")
    common.check_world_size(state, resumed_from, world)


@dataclasses.dataclass
class Run:
    """What main() set up for train(): the run folder's handles, the device, the resume state
    and this process's place in the process group (train_sft.py uses the same)."""
    out: Path
    log: object  # log(message): the console and <out>/train.log
    status: dict
    stop: object  # common.stop_requested(stop, out) says why to stop, if anyone asked
    device: torch.device
    amp_dtype: object  # torch.bfloat16 / torch.float16 / None (common.fit_batch may time bf16 on a CPU)
    scaler: object
    prec_why: str
    ranks: object  # common.OneProcess, or ddp.Ranks under torchrun (rank, world, is_main, all, barrier, ...)
    state: dict = None
    resumed_from: Path = None
    before: tuple = (0.0, 0.0, 0)  # wall_s, train_s, samples of the run's earlier segments (a resume)


def start(args, sources, notes, trainer, metric, check):
    """The process group (common.process_group), the run folder (common.open_run), the resume
    state checked by check(state, path, world), the log and status (rank 0 writes them): a Run."""
    ranks = common.process_group(args)  # first: under torchrun it picks this rank's GPU for setup_device
    out, (device, amp_dtype, scaler, prec_why), state, resumed_from, more_notes = common.open_run(args, sources)
    check(state, resumed_from, ranks.world)
    # open_run's notes first: a re-run that resumes says so in its first line
    log, status, stop = ranks.start(out, args, trainer, metric, more_notes + notes, device)
    return Run(out, log, status, stop, device, amp_dtype, scaler, prec_why, ranks, state, resumed_from)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["prepare"], ["sample"]):
        return (run_prepare if argv[0] == "prepare" else run_sample)(argv[1:])
    notes = []
    for i, a in enumerate(argv):  # --task lm: what train_lm.py always does now
        if a == "--task=lm" or a == "--task" and argv[i + 1:i + 2] == ["lm"]:
            argv = argv[:i] + argv[i + (1 if "=" in a else 2):]
            notes.append("--task lm: train_lm.py only pretrains now, the flag is not needed")
            break
    moved = argv[:1] if argv[:1] in (["ask"], ["rate"]) else [a for a in argv if a.split("=")[0] in MOVED_TO_SFT]
    if moved:
        rest = [a for i, a in enumerate(argv) if a not in ("--task", "--task=sft")
                and not (a == "sft" and argv[i - 1] == "--task" and i)]
        raise UserError(f"{moved[0]}: instruction fine-tuning moved to train_sft.py (train_lm.py pretrains only); "
                        f"run: python train_sft.py {' '.join(rest)}")
    args, sources = common.resolve_settings(parser, argv, log=notes.append)
    resolve_shape(args, sources, notes.append)
    check_flags(args)
    # -- data, validated before the run folder is touched
    url = args.data if args.data and common.is_url(args.data) else None
    common.fetch_data(args, ("data",), notes.append)
    if url:  # a text file on the web: fetched into --download-dir, then packed once beside it
        data_dir = Path(args.data + ".packed")
        if not (data_dir / "meta.json").exists():
            write_corpus(data_dir, [Path(args.data)], 0.1, [url])
            notes.append(f"--data {url}: packed into {data_dir}")
    else:
        data_dir = Path(args.data) if args.data else builtin_corpus(notes.append)
    meta = load_meta(data_dir, args.seq_len)
    cfg = model_config(args, meta["vocab_size"])
    if args.eval_only:
        return eval_only(args, sources, cfg, data_dir, meta, notes)
    run = start(args, sources, notes, "lm", "val_bpb", lambda state, path, world: check_resume(
        state, path, cfg, world, task="lm"))
    try:
        with common.recording_failures(run.out, run.status) if run.ranks.is_main else nullcontext():
            return train(args, sources, run, cfg, data_dir, meta)
    finally:
        run.ranks.end()


# -----------------------------------------------------------------------------
# train: model -> fit the machine -> optimizer -> resume -> the loop -> report

def log_presets(cfg, log):
    """One line per preset at this run's other settings: what a bigger model would cost."""
    for name in PRESETS:
        c = dict(cfg, **{k: PRESETS[name][k] for k in cfg if k in PRESETS[name]})
        log(f"preset {name:<9} {c['arch']:<5} {c['n_layer']:>2} layers, d {c['d_model']:>4}, "
            + (f"{c['n_head']} heads" if c["arch"] == "gpt" else f"{c['num_eigenstates']} eigenstates x 2 cells, "
               f"chunk {c['chunk_size']}") + f", context {c['seq_len']}: {param_count(c):,} parameters")


def describe(args, cfg, n_params):
    return (f"model: --preset {args.preset} --arch {cfg['arch']}: {cfg['n_layer']} layers, d {cfg['d_model']}, "
            + (f"{cfg['n_head']} heads" if cfg["arch"] == "gpt" else
               f"{cfg['num_eigenstates']} eigenstates x 2 cells, chunk {cfg['chunk_size']}")
            + f", context {cfg['seq_len']}; {n_params:,} parameters"
            + ("; gradient checkpointing" if args.grad_checkpointing else ""))


def make_optimizer(model, args, total_steps, device):
    """AdamW with weight decay on 2-D weights only (not on norms, biases, eigenvalues), and the
    --schedule: (optimizer, scheduler, a line for the log).

    The lr is a function of the step alone, so a resume rebuilds it from the args and the saved
    step. Linear warmup, then a cosine from --lr down to floor x --lr at the last step.
    cosine (nanoGPT's train.py + config/train_shakespeare_char.py): fixed warmup, floor lr/10;
    the decay's tail still trains at lr/10 instead of idling near zero.
    onecycle (the old default, kept bit for bit): warmup a tenth of the run, floor zero.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = common.make_optimizer([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], args,
                                      lr=args.lr, betas=(0.9, args.beta2), fused=common.fused_adamw(device))
    if args.schedule == "cosine":
        warmup, floor = max(1, min(args.warmup_steps, total_steps // 10)), 0.1
    else:
        warmup, floor = max(1, total_steps // 10), 0.0

    def lr_factor(s):  # of --lr, at step s (0-based)
        decay = 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))
        return min((s + 1) / warmup, floor + (1 - floor) * decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    name = "AdamW 8-bit" if args.optim == "adamw8bit" else "AdamW"
    return optimizer, scheduler, (f"optimizer: {name} betas (0.9, {args.beta2}), weight decay {args.weight_decay}; "
                                  f"--schedule {args.schedule}: lr {args.lr:g}, warmup {warmup} steps, cosine to "
                                  f"{floor * args.lr:g} at step {total_steps}")


def train(args, sources, run, cfg, data_dir, meta):
    out, log, status, device, ranks, state = run.out, run.log, run.status, run.device, run.ranks, run.state
    log(f"data: {data_dir} ({meta.get('documents', '?')} documents); {meta['train_tokens']:,} train / "
        f"{meta['val_tokens']:,} val tokens; byte tokenizer, vocab {meta['vocab_size']}")

    # -- model
    log_presets(cfg, log)
    model = LM(cfg).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    n_params, _ = common.count_params(model)
    log(describe(args, cfg, n_params))

    # -- fit the machine: the micro-batch (a probe on full windows; effective batch per rank fixed),
    # the precision (on a CPU, bf16 only where this model's own step is measured faster in it)
    lm_loss = functools.partial(loss_fn, device=device)
    worst = lambda bs: {"x": torch.zeros(bs, args.seq_len + 1, dtype=torch.long)}  # every LM batch has this shape
    micro_bs, accum, run.amp_dtype, why = common.fit_batch(
        model, lm_loss, worst, args, sources, device=device, amp_dtype=run.amp_dtype, prec_why=run.prec_why,
        state=state, log=log, ranks=ranks, unit=f"windows of {args.seq_len} tokens")
    E, G = micro_bs * accum, micro_bs * accum * ranks.world  # windows per rank per step, and the global batch
    tokens_per_step = G * args.seq_len

    # -- optimizer and schedule; the memory plan (it counts the optimizer's state)
    def steps_for(g):  # (steps an epoch, steps in the run) for a global batch of g windows
        per_epoch = max(1, meta["train_tokens"] // args.seq_len // g)
        return per_epoch, args.max_steps or (QUICK_STEPS if args.quick else args.epochs * per_epoch)
    steps_per_epoch, total_steps = steps_for(G)
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    optimizer, scheduler, line = make_optimizer(model, args, total_steps, device)
    log(line)
    plan = common.memory_plan(args, model, optimizer, lm_loss, worst(micro_bs), device=device, amp_dtype=run.amp_dtype,
                              world=ranks.world, log=log, worst=f"{args.seq_len}-token windows")
    if args.plan:
        return common.plan_only(out, status, log)

    # -- resume, and args.json with what fitting the machine chose
    step, best = resume(run, args, sources, model, optimizer, scheduler, chosen={
        "micro_batch": micro_bs, "grad_accum": accum, "world_size": ranks.world, "effective_batch": E,
        "global_batch": G, "tokens_per_step": tokens_per_step, "precision": args.precision,
        "device": device.type, "why": why}, steps_for=steps_for)
    train_model, no_sync = ranks.wrap(torch.compile(model) if args.compile else model)  # `model` is what we save
    peak, peak_why = device_peak(device, run.amp_dtype, args.config, out) if ranks.is_main else (1.0, "")
    fpt = flops_per_token(cfg)
    log(f"MFU against {peak_why}; model FLOPs {fpt / 1e6:.2f} M per token, {tokens_per_step:,} tokens per step")
    tb = common.tensorboard(args, out) if ranks.is_main else None
    windows = val_windows(data_dir / "val.bin", meta["val_tokens"], args.seq_len, args.eval_tokens)
    eval_bs = micro_bs  # halved for good if a validation batch runs out of memory
    loader = step_loader(get_batch, args, device, steps=range(step, max(step, total_steps)),
                         path=data_dir / "train.bin", n_tokens=meta["train_tokens"], seq_len=args.seq_len,
                         seed=args.seed, global_batch=G, rank=ranks.rank, per_rank=E)

    # -- the loop
    watch = common.memory_watch(args)
    if ranks.is_main:
        common.update_status(out, status, state="running", total_steps=total_steps, step=step)
    t_start, samples_seen, start_step, t_log, step_log = time.time(), 0, step, time.time(), step
    bar = common.progress_bar(total_steps, step) if ranks.is_main else None
    model.train()
    batch_iter = iter(loader)
    while step < total_steps:
        batch = next(batch_iter)
        with plan.measure(batch["x"].numel()):  # a step with the largest batch yet (all alike here)
            loss, _, micro_bs = common.train_step(train_model, optimizer, run.scaler, batch, lm_loss, micro_bs,
                                                  clip=args.clip, device=device, amp_dtype=run.amp_dtype, log=log,
                                                  no_sync=no_sync)
        scheduler.step()
        step, samples_seen = step + 1, samples_seen + G
        common.check_memory(watch, device, log)
        if bar is not None:
            bar.update(1)
        if step % args.log_every == 0 or step == total_steps:
            loss = ranks.all(loss, "sum") / ranks.world
            elapsed, steps = time.time() - t_log, step - step_log
            t_log, step_log = time.time(), step
            if ranks.is_main:
                peak = log_interval(run, bar, tb, step=step, total=total_steps, loss=loss,
                                    lr=scheduler.get_last_lr()[0], elapsed=elapsed, steps=steps,
                                    tokens=steps * tokens_per_step, flops=(fpt, peak),
                                    epoch=step // steps_per_epoch + 1, since=(start_step, t_start), global_batch=G)
        is_best = False
        if args.eval_every and step % args.eval_every == 0 or step == total_steps:
            if ranks.is_main:  # never a bigger batch than training's
                bpb, eval_bs = validate(run, tb, model, windows, step=step, bs=min(eval_bs, micro_bs))
                is_best, best = bpb < best, min(best, bpb)
            is_best = bool(ranks.all(is_best, "max"))  # every rank must know whether a checkpoint follows
        why = common.stop_requested(run.stop, out)
        stop = ranks.all(bool(why), "max")  # every rank stops at the same step
        if step % args.save_every == 0 or is_best or step == total_steps or stop:
            if ranks.is_main:
                save(run, args, model, optimizer, scheduler, task="lm", cfg=cfg, step=step, best=best,
                     micro_bs=micro_bs, accum=accum, t_start=t_start, samples=samples_seen, best_now=is_best)
            ranks.barrier()  # no rank runs ahead of a checkpoint being written
        if stop:
            return stopped(run, bar, tb, step, why)
    del batch_iter  # its worker processes end here
    if bar is not None:
        bar.close()
    ranks.barrier()
    if ranks.is_main:
        report(args, run, model, cfg, windows=windows, eval_bs=min(eval_bs, micro_bs), best=best, step=step,
               start_step=start_step, t_start=t_start, samples=samples_seen, fpt=fpt, peak=peak, n_params=n_params,
               global_batch=G, memory=plan.figures(run.log))
    if tb:
        tb.close()
    return 0


def resume(run, args, sources, model, optimizer, scheduler, *, chosen, steps_for):
    """The checkpoint being resumed (run.state) restored into the model, optimizer, scheduler, scaler and RNG (its step
    moved to a new global batch when one was typed: steps_for(g) = (steps an epoch, steps in the run) for a global
    batch g), and args.json written with the settings and `chosen` (what fitting the machine chose). Returns (step,
    best metric): (0, inf) for a fresh run. Shared with train_sft.py."""
    state = run.state
    step, best = (state["step"], state["best"]) if state else (0, float("inf"))
    run.before = common.restore_training_state(state, model, optimizer, scheduler, run.scaler)
    if state:
        run.log(f"resumed from {run.resumed_from} (step {step})")
        G0 = state["micro_bs"] * state["accum"] * run.ranks.world
        if G0 != chosen["global_batch"]:
            (per_epoch0, total0), (per_epoch, total) = steps_for(G0), steps_for(chosen["global_batch"])
            step, _ = common.rebatch(scheduler, step, 0, per_epoch=(per_epoch0, per_epoch), total=(total0, total),
                                     log=run.log)
    if run.ranks.is_main:
        common.truncate_metrics(run.out, step)  # records a killed run wrote after its last checkpoint
        common.write_args(run.out, args, sources, chosen)
    return step, best


def step_loader(fn, args, device, *, steps, **kw):
    """The batches of `steps` (a range): fn(step=i, **kw) depends on (seed, i) only, so a resumed run
    draws the same ones; --workers processes build them ahead. Shared with train_sft.py."""
    return torch.utils.data.DataLoader(common.StepBatches(fn, **kw), batch_size=None, sampler=steps,
                                       num_workers=args.workers, worker_init_fn=common.quiet_worker,
                                       pin_memory=args.pin_memory and device.type == "cuda")


def log_interval(run, bar, tb, *, step, total, loss, lr, elapsed, steps, tokens, flops, epoch, since, global_batch):
    """Every --log-every steps (rank 0): the log line (common.log_step, over `steps` steps and `tokens` tokens of the
    global batch in `elapsed` seconds) with MFU (flops = (model FLOPs per token, the device's peak)), its
    metrics.jsonl record, status.json (the pace and ETA since `since` = the (step, time) this process started at) and
    TensorBoard. Returns the peak, re-measured if MFU read over 100 % (checked_peak). Shared with train_sft.py."""
    tps, (fpt, peak), (start_step, t_start) = tokens / elapsed, flops, since
    peak = checked_peak(peak, fpt, tps, run.ranks.world, run.device, run.amp_dtype, run.log)
    mfu, seconds = fpt * tps / (peak * run.ranks.world), time.time() - t_start
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}", refresh=False)
    mem = common.log_step(run.log, step, total, loss, lr, elapsed=elapsed, steps=steps, items=tokens, unit="tokens",
                          device=run.device, extra=f" | MFU {100 * mfu:.1f}%", tb=tb)
    common.append_metrics(run.out, {"step": step, "loss": round(loss, 6), "lr": lr,
                                    "ms_per_step": round(1000 * elapsed / steps, 1), "tokens_per_s": round(tps),
                                    "mfu": round(mfu, 4), "peak_mem_mb": common.peak_memory_mb(run.device)})
    common.update_status(run.out, run.status, step=step, epoch=epoch, loss=round(loss, 5),
                         samples_per_s=round(global_batch * (step - start_step) / seconds, 1), tokens_per_s=round(tps),
                         mfu=round(mfu, 4), eta_s=round((total - step) * seconds / (step - start_step)), **mem)
    return peak


def validate(run, tb, model, windows, *, step, bs):
    """The validation at `step` (rank 0; bs windows a batch, halved if that runs out of memory): its
    metrics.jsonl record, log line, status.json and TensorBoard. Returns (bits/byte, the bs that fitted)."""
    (val_loss, bpb), bs = common.evaluate_halving(lambda b: evaluate(model, windows, run.device, run.amp_dtype, b),
                                                  bs, run.device, run.log)
    common.append_metrics(run.out, {"step": step, "val_loss": round(val_loss, 6), "val_bpb": round(bpb, 5)}, tb)
    run.log(f"step {step}: val loss {val_loss:.4f} nats/token, {bpb:.4f} bits/byte ({len(windows)} windows)")
    common.update_status(run.out, run.status, metric=round(bpb, 5))
    return bpb, bs


def save(run, args, model, optimizer, scheduler, *, task, cfg, step, best, micro_bs, accum, t_start, samples,
         best_now=False):
    """A checkpoint at `step` (rank 0): the training state and the run's plain data, its times and
    samples counted over every segment of the run (totals). Shared with train_sft.py."""
    wall, train_s, samples = totals(run, t_start, samples)
    ckpt = common.training_state(
        model, optimizer, scheduler, run.scaler, step=step, best=best, micro_bs=micro_bs, accum=accum,
        world_size=run.ranks.world, model_cfg=cfg, args=dict(vars(args)), task=task, wall_s=wall, train_s=train_s,
        samples=samples)
    path = common.save_checkpoint(run.out, step, ckpt, args.keep, protect=run.resumed_from, best=best_now, log=run.log)
    common.update_status(run.out, run.status, last_checkpoint=str(path.resolve()))


def totals(run, t_start, samples):
    """(wall seconds, training seconds, samples) of the whole run: run.before holds the earlier
    segments' (from the checkpoint resumed), t_start and `samples` are this process's."""
    wall_before, train_before, samples_before = run.before
    return (wall_before + time.time() - run.status["started"], train_before + time.time() - t_start,
            samples_before + samples)


def stopped(run, bar, tb, step, why):
    """A stop request (a signal, the STOP file, another rank) after the checkpoint of `step`."""
    run.log(f"stopped by {why or 'another rank'} at step {step}; re-run the same command to resume")
    if run.ranks.is_main:
        common.update_status(run.out, run.status, state="stopped", step=step)
        bar.close()
    if tb:
        tb.close()
    return 0


def report(args, run, model, cfg, *, windows, eval_bs, best, step, start_step, t_start, samples, fpt, peak,
           n_params, global_batch, memory):
    """The end of a run: the final validation (at eval_bs, the batch that fitted), summary.json and a sample."""
    out, log, status, device = run.out, run.log, run.status, run.device
    if step == start_step and (out / "summary.json").exists():
        return common.finished_before(out, status, step, log)
    wall, train_s, samples = totals(run, t_start, samples)
    (val_loss, val_bpb), _ = common.evaluate_halving(
        lambda bs: evaluate(model, windows, device, run.amp_dtype, bs), eval_bs, device, log)
    tps = samples * args.seq_len / max(1e-9, train_s)
    common.write_json_atomic(out / "summary.json", dict(
        trainer="lm", metric="val_bpb", value=round(val_bpb, 5), best_value=round(best, 5), val_loss=round(val_loss, 6),
        steps=step, tokens_per_s=round(tps, 1), samples_per_s=round(samples / max(1e-9, train_s), 2),
        mfu=round(fpt * tps / (peak * run.ranks.world), 4), params=n_params, trainable_params=n_params,
        wall_s=round(wall, 1), arch=cfg["arch"], preset=args.preset, seq_len=args.seq_len,
        world_size=run.ranks.world, device=device.type, precision=args.precision,
        effective_batch=global_batch // run.ranks.world, global_batch=global_batch,
        tokens_trained=samples * args.seq_len, **memory))
    text = decode(generate(model, encode("The "), 200, 0.8, 40, device, args.seed))
    log(f"done: val {val_bpb:.4f} bits/byte ({val_loss:.4f} nats/token; 8 = knowing nothing about bytes) after "
        f"{step} steps, {samples * args.seq_len:,} tokens, {tps:,.0f} tokens/s, in {wall:.0f}s; "
        f"summary {out / 'summary.json'}")
    log("sample: " + repr("The " + text))
    common.update_status(out, status, state="finished", step=step, metric=round(val_bpb, 5), eta_s=0)


# -----------------------------------------------------------------------------
# sample: text from a trained run; greedy decoding for train_sft.py; --eval-only

def sample_parser():
    p = common.Parser(prog="train_lm.py sample", allow_abbrev=False, formatter_class=common.HelpFormat,
                      description="generate text from a run folder's best checkpoint (else its newest)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max-new-tokens", type=common.pos_int, default=300, metavar="N", help="bytes to generate")
    p.add_argument("--temperature", type=common.pos_float, default=0.8, help="below 1: safer, above 1: wilder")
    p.add_argument("--top-k", type=common.nonneg_int, default=40, metavar="K",
                   help="sample among the K likeliest tokens (0 = all)")
    p.add_argument("--seed", type=common.nonneg_int, default=1337, help="random seed")
    p.add_argument("--resume", default=None, metavar="PATH", help="this checkpoint file instead")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when available")
    return p


@torch.inference_mode()
def generate(model, prompt_ids, n_new, temperature, top_k, device, seed):
    """Sample n_new tokens after prompt_ids; the context is cut to the model's seq_len."""
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids or [EOT]], device=device)
    T = model.cfg["seq_len"]
    for _ in range(n_new):
        logits = model(ids[:, -T:])[:, -1].float() / temperature  # (1, V)
        if top_k:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    model.train()
    return ids[0, len(prompt_ids or [EOT]):].tolist()


def pad_to(n, cap, multiple=32):
    """n rounded up to a multiple of 32, at most cap: the length of train_sft.py's batches and decoding steps.
    Past a row's last token padding changes nothing (attention is causal), and a few shapes repeat: with a new
    length every step, oneDNN built bf16 kernels for each and glibc's heap kept growing (docs/sft.md)."""
    return min(cap, -(-n // multiple) * multiple)


@torch.inference_mode()
def greedy_batch(model, prompts, max_new, device, stop=EOT, rows=64):
    """Greedy continuations of many prompts (lists of ids) at once: train_sft.py's decoder (its test split's command
    accuracy, and ask).

    Prompts are right-padded into one buffer and each row keeps its own length: with causal attention the padding after
    a row's last token cannot change that token's logits, so one forward over (rows, longest) serves every row. A row
    ends at `stop`, <eot>, or the context."""
    model.eval()
    T = model.cfg["seq_len"]
    outs = []
    for a in range(0, len(prompts), rows):
        chunk = [p[-T:] for p in prompts[a:a + rows]]
        lens = torch.tensor([len(p) for p in chunk])
        buf = torch.full((len(chunk), min(T, int(lens.max()) + max_new)), EOT, dtype=torch.long)
        for i, p in enumerate(chunk):
            buf[i, :len(p)] = torch.tensor(p)
        done = lens >= buf.shape[1]
        for _ in range(max_new):
            live = (~done).nonzero()[:, 0]
            if len(live) == 0:
                break
            hi = pad_to(int(lens[live].max()), buf.shape[1])  # a new width every token grew the heap to GBs
            logits = model(buf[live, :hi].to(device))  # (live, hi, V)
            nxt = logits[torch.arange(len(live)), (lens[live] - 1).to(device)].argmax(-1).cpu()
            buf[live, lens[live]] = nxt
            lens[live] += 1
            done[live] = (nxt == stop) | (nxt == EOT) | (lens[live] >= buf.shape[1])
        outs += [buf[i, len(p):int(lens[i])].tolist() for i, p in enumerate(chunk)]
    model.train()
    return outs


def load_model(args, trainer):
    """(model, checkpoint, its path, device): the model a run folder (args.out) serves, on
    args.device. Shared with train_sft.py's ask."""
    state, path = common.load_run_model(args.out, "--out", trainer, "model_cfg", resume=getattr(args, "resume", None))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible to PyTorch; use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model = LM(state["model_cfg"]).to(device)
    model.load_state_dict(state["model"])
    return model, state, path, device


def eval_model(args, sources, cfg, trainer):
    """--eval-only's model (train_sft.py's too): the run folder (--out, else the newest `trainer` run
    under runs/), its best.pt or --resume CKPT, checked against this command's model flags, on
    --device, in the precision the run trained in (unless --precision is typed), with the batch its
    report evaluated at (the checkpoint's micro-batch; the sum's order sets the last digits).
    Writes nothing. Returns (out, model, checkpoint, its path, device, amp_dtype, batch)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--eval-only: runs as one process (no torchrun)")
    out = Path(args.out) if args.out else common.newest_run(trainer)
    if out is None:
        raise UserError(f"--eval-only: no {common.TRAINERS[trainer]} run under runs/ to evaluate; pass --out RUN")
    state, path = common.load_run_model(out, "--out", trainer, "model_cfg", resume=args.resume)
    if state.get("task", "lm") != trainer:
        raise UserError(f"--eval-only: {path} is a {common.TRAINERS[state.get('task', 'lm')]} run; evaluate it "
                        f"with that trainer")
    if state["model_cfg"] != cfg:
        diff = ", ".join(f"{k} {state['model_cfg'].get(k)} (now {v})" for k, v in cfg.items()
                         if state["model_cfg"].get(k) != v)
        raise UserError(f"--eval-only: {path} was trained with {diff}; repeat the training command's flags")
    typed = sources.get("precision") == "flag"  # before setup_device, which marks a typed "auto" as "auto"
    device, amp_dtype, _, _ = common.setup_device(args, sources)
    if not typed and (saved := (state.get("args") or {}).get("precision")) in ("fp32", "bf16", "fp16"):
        args.precision = "fp32" if saved == "fp16" and device.type == "cpu" else saved  # fp16 runs on CUDA only here
        amp_dtype = common.DTYPES[args.precision]
    model = LM(state["model_cfg"]).to(device)
    model.load_state_dict(state["model"])
    return out, model, state, path, device, amp_dtype, int(state.get("micro_bs", 1))


def eval_only(args, sources, cfg, data_dir, meta, notes):
    """--eval-only: the report's validation figures for a saved model (eval_model), printed and
    written to <out>/eval.json. No checkpoint, status.json, metrics.jsonl or train.log is touched.
    The LM's data has no test split: its validation windows are the whole evaluation."""
    for note in notes:
        print(note)
    out, model, state, path, device, amp_dtype, bs = eval_model(args, sources, cfg, "lm")
    windows = val_windows(data_dir / "val.bin", meta["val_tokens"], args.seq_len, args.eval_tokens)
    (val_loss, val_bpb), _ = common.evaluate_halving(lambda b: evaluate(model, windows, device, amp_dtype, b),
                                                     bs, device, print)
    common.write_json_atomic(out / "eval.json", {
        "trainer": "lm", "metric": "val_bpb", "value": round(val_bpb, 5), "val_loss": round(val_loss, 6),
        "val_bpb": round(val_bpb, 5), "checkpoint": str(Path(path).resolve()), "step": state["step"],
        "data": str(data_dir), "val_windows": len(windows), "val_tokens": len(windows) * args.seq_len, "test": None,
        "device": device.type, "precision": args.precision, "batch": bs})
    print(f"eval: val {val_bpb:.4f} bits/byte ({val_loss:.4f} nats/token; 8 = knowing nothing about bytes) on "
          f"{len(windows)} windows of {data_dir} (no test split), model {path} (step {state['step']}); "
          f"{out / 'eval.json'}")
    return 0


def run_sample(argv):
    args = sample_parser().parse_args(argv)
    model, state, path, device = load_model(args, "lm")
    print(f"model {path} (step {state['step']}, {state['model_cfg']['arch']}); prompt {args.prompt!r}")
    ids = generate(model, encode(args.prompt), args.max_new_tokens, args.temperature, args.top_k, device, args.seed)
    print(args.prompt + decode(ids))
    return 0


if __name__ == "__main__":
    common.run_main(main)
