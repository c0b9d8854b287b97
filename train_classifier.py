"""train_classifier.py -- sort receipt / expense items (or any short texts) into categories, in
plain PyTorch: a fastText-style n-gram model, a transformer encoder, LoRA; no transformers, no
peft. Every step is in this file.

    python train_classifier.py --quick --out runs/c                    # laptop CPU: fasttext + regression, ~10 s
    python train_classifier.py --data train.csv --test-data test.csv --out runs/mine   # validation split off train
    python train_classifier.py --pretrained ~/models/all-MiniLM-L6-v2 --data train.csv --out runs/m   # LoRA
    python train_classifier.py --predict "UBER *TRIP 12.50" --out runs/c
    python train_classifier.py --predict-file items.txt --out runs/c

Without --pretrained the default model is fasttext: the mean of the embeddings of an item's
words, word bigrams and character n-grams, then a linear layer; beside it, a TF-IDF logistic
regression on the same n-grams, fitted by L-BFGS before training, and the two models'
probabilities averaged (--linear-c 0: fasttext alone). On a few thousand real rows this beats a
transformer trained from scratch (`--preset small`, or the DistilBERT/BERT shapes) by ~13
points, fasttext alone by 0.3 and matches the best linear baseline (docs/real-data.md). With
--pretrained DIR (a local Hugging Face folder: config.json, vocab.txt, model.safetensors or
pytorch_model.bin) the encoder is frozen and only LoRA adapters and the head train, as in the
seed (DistilBERT, r 16, alpha 32 on q and v: 891,656 trainable parameters), on the mean over
tokens, at lr 1e-3 for 4 epochs (measured).
Re-running the same command resumes from the newest checkpoint in --out."""

import contextlib
import json
import math
import os
import random
import re
import struct
import sys
import time
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

CATEGORIES = ["Education", "Entertainment", "Food", "Healthcare", "Housing", "Shopping",
              "Transportation", "Utilities"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# -----------------------------------------------------------------------------
# config

parser = common.make_parser(__doc__, trainer="classifier", epochs=3, lr=None, effective_batch=16,
                            save_every=50, keep=2)
g = parser.add_argument_group("classifier")
g.add_argument("--data", default=None, metavar="CSV", help="training CSV with columns text,label "
               "(default: built-in receipt items)")
g.add_argument("--val-data", default=None, metavar="CSV",
               help="validation CSV (default: 15%% of --data, split off stratified by label)")
g.add_argument("--test-data", default=None, metavar="CSV",
               help="test CSV (default: 15%% of --data, split off stratified by label)")
g.add_argument("--train-size", type=common.pos_int, default=840, metavar="N",
               help="built-in training items, about (stratified rounding); plus 15%% each for validation and test")
g.add_argument("--max-len", type=common.pos_int, default=64,
               help="tokens per item, [CLS]/[SEP] included (fasttext: words per item)")
g.add_argument("--preset", "--model", dest="preset", choices=["fasttext", "small", "distilbert", "bert"],
               default="fasttext",
               help="model size when training from scratch (ignored with --pretrained): fasttext = mean of "
                    "word, bigram and character n-gram embeddings + a linear layer (won on small real data: "
                    "docs/real-data.md); small/distilbert/bert = transformer encoder shapes. --model is "
                    "the old spelling")
# optimal_config.json files written before --model became --preset name the key "model";
# resolve_settings maps config keys to dests, so this flagless dest catches it (main() folds it in)
parser.set_defaults(model=None)
g.add_argument("--linear-c", type=float, default=30.0, metavar="C",
               help="fasttext: a TF-IDF logistic regression on the same n-grams is fitted beside it (L2 penalty "
                    "1/2C) and their probabilities averaged (measured: docs/real-data.md); 0 = fasttext alone")
g.add_argument("--pooling", choices=["cls", "mean"], default=None,
               help="what the head reads: [CLS], or the mean over tokens (default: mean with --pretrained, "
                    "cls from scratch; measured: docs/real-data.md)")
g.add_argument("--pretrained", default=None, metavar="DIR",
               help="local Hugging Face BERT/DistilBERT folder to fine-tune (config.json, vocab.txt, weights)")
g.add_argument("--vocab-size", type=common.pos_int, default=None,
               help="vocabulary cap when it is built from the training data (default: 8000 word pieces for "
                    "the transformers, 200000 n-grams for fasttext)")
g.add_argument("--lora-r", type=common.pos_int, default=16, help="LoRA rank")
g.add_argument("--lora-alpha", type=common.pos_float, default=32, help="LoRA scale numerator (scale = alpha/r)")
g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input")
g.add_argument("--lora-targets", default="q,v", help="comma list of q,k,v,o,ffn: linears that get adapters")
g.add_argument("--full-finetune", action="store_true",
               help="with --pretrained: train every weight instead of LoRA adapters")
g.add_argument("--lora", action="store_true",
               help="without --pretrained: LoRA on a frozen random encoder (to measure, not to use)")
g.add_argument("--merge", action="store_true",
               help="fold LoRA into the base weights for the exported model.pt and for --predict")
g.add_argument("--patience", type=common.pos_int, default=3,
               help="early stopping: epochs without a better validation accuracy")
g.add_argument("--predict", default=None, metavar="TEXT", help="classify TEXT with the model in --out")
g.add_argument("--predict-file", default=None, metavar="FILE", help="classify every line of FILE")

# measured on real data (docs/real-data.md); --quick: fasttext half the epochs, --pretrained 1
FASTTEXT_EPOCHS, FASTTEXT_LR = 10, 5e-3  # from scratch
PRETRAINED_EPOCHS, LORA_LR = 4, 1e-3  # --pretrained (epochs also for --full-finetune), LoRA
PRESETS = {  # name: (layers, dim, heads, ffn, positions, token types); fasttext: embedding width
    "fasttext": dict(kind="fasttext", dim=64),
    "small": dict(n_layers=4, dim=256, n_heads=4, hidden_dim=1024, max_pos=128, type_vocab=0),
    "distilbert": dict(n_layers=6, dim=768, n_heads=12, hidden_dim=3072, max_pos=512, type_vocab=0),
    "bert": dict(n_layers=12, dim=768, n_heads=12, hidden_dim=3072, max_pos=512, type_vocab=2),
}


# -----------------------------------------------------------------------------
# tokenizer: BERT's basic tokenizer + greedy longest-match-first WordPiece

def is_punct(ch):
    cp = ord(ch)  # BERT counts every non-alphanumeric ASCII character as punctuation, e.g. "$", "*"
    return (33 <= cp <= 47) or (58 <= cp <= 64) or (91 <= cp <= 96) or (123 <= cp <= 126) or \
        unicodedata.category(ch).startswith("P")


def basic_tokenize(text, lower=True, keep=()):
    """Clean, lower-case, strip accents, split on whitespace and punctuation, CJK chars apart.
    Special tokens in `keep` (e.g. "[MASK]") written in the text stay whole, as in BERT."""
    if keep:
        parts = re.split("(" + "|".join(map(re.escape, keep)) + ")", text)
        return [w for p in parts for w in ([p] if p in keep else basic_tokenize(p, lower))]
    out, word = [], []
    # as BERT's _clean_text: " \t\n\r" and category Zs become a space; other control, format,
    # private-use and unassigned characters (category C*) are dropped
    text = "".join(" " if c in "\t\n\r" or unicodedata.category(c) == "Zs" else c for c in text
                   if not (ord(c) in (0, 0xFFFD) or (unicodedata.category(c).startswith("C") and c not in "\t\n\r")))
    if lower:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")  # é -> e
    for ch in text:
        cjk = 0x4E00 <= ord(ch) <= 0x9FFF or 0x3400 <= ord(ch) <= 0x4DBF or 0xF900 <= ord(ch) <= 0xFAFF
        if ch.isspace() or is_punct(ch) or cjk:  # isspace: BERT then splits with str.split()
            if word:
                out.append("".join(word))
                word = []
            if not ch.isspace():
                out.append(ch)
        else:
            word.append(ch)
    if word:
        out.append("".join(word))
    return out


def wordpiece(word, vocab, max_chars=100):
    """Greedy longest-match-first: 'unaffable' -> un ##aff ##able. A word with a piece
    missing from the vocabulary becomes [UNK] as a whole, as in BERT."""
    if len(word) > max_chars:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else "##" + word[start:end]
            if piece in vocab:
                break
            end -= 1
        if end == start:
            return ["[UNK]"]
        pieces.append(piece)
        start = end
    return pieces


class Tokenizer:
    def __init__(self, itos, lower=True):
        self.itos, self.lower = list(itos), lower
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.unk, self.cls, self.sep = (self.stoi[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        self.keep = tuple(t for t in SPECIALS if t in self.stoi)

    def tokens(self, text):
        return [w if w in self.keep else p for w in basic_tokenize(text, self.lower, self.keep)
                for p in ([w] if w in self.keep else wordpiece(w, self.stoi))]

    def encode(self, texts, max_len):
        """(N, max_len) ids and attention mask: [CLS] pieces [SEP] [PAD]..., cut to max_len."""
        ids = torch.full((len(texts), max_len), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [self.cls] + [self.stoi[p] for p in self.tokens(t)][:max_len - 2] + [self.sep]
            ids[i, :len(seq)] = torch.tensor(seq)
        return ids, ids != self.pad


def build_vocab(texts, cap):
    """Vocabulary from training text: specials, every character seen (alone and as ##x, so no
    alphabetic word is ever [UNK]), then whole words by frequency, up to `cap`."""
    counts, chars = {}, set()
    for t in texts:
        for w in basic_tokenize(t):
            counts[w] = counts.get(w, 0) + 1
            chars.update(w)
    base = SPECIALS + sorted(chars) + ["##" + c for c in sorted(chars)]
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in set(base)]
    return base + words[:max(0, cap - len(base))]


# fastText's features (Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification";
# Bojanowski et al. 2017 for the character n-grams): the words, the word bigrams, and the
# character 3- to 5-grams of each word wrapped in < >, so "ssh" gives <ss ssh sh> and a rare or
# misspelt word still shares pieces with known ones. fastText hashes them into buckets; we keep
# an exact vocabulary of the ones seen in training (small data has few), so no two collide.

def ngrams(text, max_words):
    words = basic_tokenize(text)[:max_words]
    feats = words + [a + " " + b for a, b in zip(words, words[1:])]
    for w in words:
        w = "<" + w + ">"
        feats += ["#" + w[i:i + n] for n in (3, 4, 5) if len(w) > n for i in range(len(w) - n + 1)]
    return feats


def build_ngram_vocab(texts, cap, max_words):
    """[PAD], then every n-gram of the training text by frequency (ties alphabetical), up to cap."""
    counts = {}
    for t in texts:
        for f in ngrams(t, max_words):
            counts[f] = counts.get(f, 0) + 1
    return ["[PAD]"] + sorted(counts, key=lambda f: (-counts[f], f))[:cap - 1]


class NgramTokenizer:
    """The Tokenizer interface (itos, lower, encode) over fastText's n-grams; unseen n-grams are dropped."""

    def __init__(self, itos, lower=True):
        self.itos, self.lower = list(itos), True  # basic_tokenize lower-cases; kept for the checkpoint
        self.stoi = {f: i for i, f in enumerate(self.itos)}

    def encode(self, texts, max_len):
        """(N, longest) n-gram ids padded with 0 and their mask; max_len caps the words per item."""
        seqs = [[self.stoi[f] for f in ngrams(t, max_len) if f in self.stoi] for t in texts]
        ids = torch.zeros(len(texts), max(1, max(map(len, seqs), default=1)), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != 0


# -----------------------------------------------------------------------------
# model: a BERT / DistilBERT-shaped encoder (post-LN), DistilBERT's parameter names

class LoRALinear(nn.Linear):
    """y = W0 x + (alpha/r) B(A(dropout(x))). W0 (and bias) frozen, A Kaiming-uniform, B zeros,
    so at start the layer computes exactly W0 x. Keeps nn.Linear's weight/bias names, so base
    checkpoints load into it unchanged; the adapter is lora_A / lora_B."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = alpha / r
        self.lora_A = nn.Parameter(self.weight.new_empty(r, self.in_features))  # (r, in)
        self.lora_B = nn.Parameter(self.weight.new_zeros(self.out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_drop = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * (self.lora_drop(x) @ self.lora_A.T @ self.lora_B.T)

    def merged(self):
        """A plain nn.Linear computing the same function (in eval mode): W0 + scale * B A."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.scale * self.lora_B @ self.lora_A)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


class Block(nn.Module):
    def __init__(self, dim, n_heads, hidden_dim, eps, dropout):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.attention = nn.Module()
        for name in ("q_lin", "k_lin", "v_lin", "out_lin"):
            setattr(self.attention, name, nn.Linear(dim, dim))
        self.sa_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Module()
        self.ffn.lin1, self.ffn.lin2 = nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.output_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):  # x (B, T, D), mask (B, T) True = real token
        B, T, D = x.shape
        a = self.attention
        q, k, v = (lin(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                   for lin in (a.q_lin, a.k_lin, a.v_lin))  # (B, H, T, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        x = self.sa_layer_norm(x + self.drop(a.out_lin(y.transpose(1, 2).reshape(B, T, D))))  # post-LN
        h = self.ffn.lin2(F.gelu(self.ffn.lin1(x)))  # exact (erf) GELU, as BERT
        return self.output_layer_norm(x + self.drop(h))


class Encoder(nn.Module):
    """Embeddings (word + position [+ token type]) -> LayerNorm -> N post-LN blocks -> head on
    [CLS]: pre_classifier Linear(d, d) -> ReLU -> Dropout(0.2) -> classifier Linear(d, labels)."""

    def __init__(self, vocab_size, n_labels, *, n_layers, dim, n_heads, hidden_dim, max_pos, type_vocab,
                 eps=1e-12, dropout=0.1, pooling="cls"):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, dim)
        if type_vocab:
            self.embeddings.token_type_embeddings = nn.Embedding(type_vocab, dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.transformer = nn.Module()
        self.transformer.layer = nn.ModuleList(Block(dim, n_heads, hidden_dim, eps, dropout) for _ in range(n_layers))
        self.pre_classifier = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, n_labels)
        self.drop, self.head_drop = nn.Dropout(dropout), nn.Dropout(0.2)
        self.grad_checkpointing = False
        self.pooling = pooling
        self.apply(self._init)

    @staticmethod
    def _init(m):  # BERT's init: N(0, 0.02), LayerNorm (1, 0)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, ids, mask):  # ids (B, T) -> hidden (B, T, D)
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.size(1), device=ids.device))
        if hasattr(e, "token_type_embeddings"):
            x = x + e.token_type_embeddings.weight[0]  # single-segment input: type 0 everywhere
        x = self.drop(e.LayerNorm(x))
        for block in self.transformer.layer:
            x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False) \
                if self.grad_checkpointing and self.training else block(x, mask)
        return x

    def forward(self, ids, mask):  # -> logits (B, labels)
        h = self.encode(ids, mask)  # (B, T, D)
        if self.pooling == "mean":  # over real tokens: how sentence-transformers trained all-MiniLM
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            pooled = h[:, 0]  # [CLS]
        return self.classifier(self.head_drop(F.relu(self.pre_classifier(pooled))))


class FastText(nn.Module):
    """The mean of an item's n-gram embeddings, then one linear layer (fastText's supervised
    model). An item with no known n-gram averages nothing and gets the bias alone. With
    linear=C (> 0) a logistic regression on the same n-grams sits beside it (fitted before
    training, then frozen: fit_linear); in eval mode the output is then the log of the two
    models' averaged probabilities, their ensemble."""

    def __init__(self, vocab_size, n_labels, dim, kind="fasttext", linear=0.0):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.classifier = nn.Linear(dim, n_labels)
        nn.init.uniform_(self.embeddings.weight, -1 / dim, 1 / dim)  # fastText's init
        with torch.no_grad():
            self.embeddings.weight[0].zero_()
        self.linear = TfidfRegression(vocab_size, n_labels) if linear else None
        self.grad_checkpointing = False  # nothing to checkpoint; the attribute keeps the trainer's code uniform

    def forward(self, ids, mask):  # ids, mask (B, T) -> logits (B, labels)
        m = mask.unsqueeze(-1).to(self.embeddings.weight.dtype)  # (B, T, 1)
        h = (self.embeddings(ids) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, dim)
        logits = self.classifier(h)
        if self.linear is None or self.training:  # fastText trains on its own loss
            return logits
        return ((logits.float().softmax(-1) + self.linear(ids, mask).softmax(-1)) / 2).log()


def term_counts(ids):
    """(B, T) -> (B, T): how often each position's id occurs in its row (tf). Equal ids are
    neighbours once sorted: count each run, then put the counts back in the row's order."""
    s, order = ids.sort(1)
    run = torch.cat([torch.zeros_like(s[:, :1]), (s[:, 1:] != s[:, :-1]).long()], 1).cumsum(1)  # (B, T)
    tf = torch.zeros_like(s).scatter_add_(1, run, torch.ones_like(s)).gather(1, run)  # sorted order
    return torch.empty_like(tf).scatter_(1, order, tf)


class TfidfRegression(nn.Module):
    """Multinomial logistic regression on an item's TF-IDF vector of n-grams, the linear
    baseline a practitioner tries first (scikit-learn's TfidfVectorizer + LogisticRegression):
    tf = the n-gram's count in the item, idf = ln((1 + N) / (1 + df)) + 1 over the N training
    items, the vector scaled to unit length; then one weight per n-gram and label."""

    def __init__(self, vocab_size, n_labels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, n_labels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_labels), requires_grad=False)
        # fit_linear sets it; a frozen parameter, not a buffer, so that DDP does not re-send it every step
        self.idf = nn.Parameter(torch.ones(vocab_size), requires_grad=False)

    def tfidf(self, ids, mask):  # (B, T) -> (B, T): each position's share of the unit vector
        w = self.idf[ids] * mask  # an n-gram seen tf times in the row adds tf * idf over its positions
        return w / (term_counts(ids) * w * w).sum(1, keepdim=True).sqrt().clamp(min=1e-12)  # |v|^2 = sum (tf idf)^2

    def forward(self, ids, mask, weights=None):  # -> logits (B, labels), in fp32
        w = self.tfidf(ids, mask) if weights is None else weights
        offsets = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)[:-1]])  # rows in ids[mask]
        return F.embedding_bag(ids[mask], self.weight, offsets, per_sample_weights=w[mask].float(), mode="sum") \
            + self.bias


def fit_linear(linear, data, C, log):
    """Fit the regression beside fasttext on every training row at once by L-BFGS: its loss
    (summed cross-entropy + |W|^2 / 2C, the bias unpenalised, as scikit-learn's) is convex, so
    this is its one optimum, which minibatch steps stopped early do not reach (docs/real-data.md
    measured 0.5-0.9 points less). Deterministic; a resumed run loads it from the checkpoint.
    data: the pre-tokenized training split. Called by train() before the loop."""
    t0 = time.time()
    ids, mask, y = (data[k].to(linear.weight.device) for k in ("ids", "mask", "y"))
    # df: in how many rows each n-gram occurs; each of its tf positions in a row adds 1 / tf
    df = torch.bincount(ids[mask], (1 / term_counts(ids))[mask].double(), minlength=len(linear.idf)).round().float()
    linear.idf.copy_(((1 + len(y)) / (1 + df)).log() + 1)
    w = linear.tfidf(ids, mask)  # (N, T), fixed while fitting
    params = [linear.weight, linear.bias]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.LBFGS(params, max_iter=300, tolerance_grad=1e-5, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(ids, mask, w), y, reduction="sum") + (linear.weight ** 2).sum() / (2 * C)
        loss.backward()
        return loss
    opt.step(closure)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    with torch.no_grad():
        acc = (linear(ids, mask, w).argmax(-1) == y).float().mean().item()
    log(f"TF-IDF logistic regression beside fasttext (C {C:g}): fitted by L-BFGS in {time.time() - t0:.1f} s, "
        f"{opt.state[params[0]]['n_iter']} iterations, train accuracy {acc:.3f}")


def build_model(shape, n_labels):
    """The model a checkpoint's `shape` describes: FastText, or the transformer Encoder."""
    return FastText(n_labels=n_labels, **shape) if shape.get("kind") == "fasttext" else \
        Encoder(n_labels=n_labels, **shape)


LORA_NAMES = {"q": ["attention.q_lin"], "k": ["attention.k_lin"], "v": ["attention.v_lin"],
              "o": ["attention.out_lin"], "ffn": ["ffn.lin1", "ffn.lin2"]}


def add_lora(model, targets, r, alpha, dropout):
    """Freeze everything, wrap the target linears of every block in LoRALinear, and leave the
    head (pre_classifier, classifier) trainable, as the seed's PEFT config did."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.layer:
        for t in targets:
            for path in LORA_NAMES[t]:
                parent_name, name = path.split(".")
                parent = getattr(block, parent_name)
                setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout))
    for p in [*model.pre_classifier.parameters(), *model.classifier.parameters()]:
        p.requires_grad_(True)
    return model


def merge_lora(model):
    """Replace every LoRALinear by the plain Linear it equals (for export and fast inference)."""
    for block in model.transformer.layer:
        for parent in (block.attention, block.ffn):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())
    return model


# -----------------------------------------------------------------------------
# pretrained Hugging Face checkpoints: config.json, vocab.txt, safetensors or .bin

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Parse a .safetensors file: 8-byte little-endian header length, a JSON header mapping
    names to dtype/shape/byte offsets, then the raw little-endian tensor bytes. No code runs."""
    buf = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


# HF BERT names -> ours (DistilBERT's); DistilBERT's own names only lose their prefix
BERT_RENAMES = [(r"^encoder\.layer\.", "transformer.layer."), (r"\.attention\.self\.query\.", ".attention.q_lin."),
                (r"\.attention\.self\.key\.", ".attention.k_lin."),
                (r"\.attention\.self\.value\.", ".attention.v_lin."),
                (r"\.attention\.output\.dense\.", ".attention.out_lin."),
                (r"\.attention\.output\.LayerNorm\.", ".sa_layer_norm."),
                (r"\.intermediate\.dense\.", ".ffn.lin1."), (r"\.output\.dense\.", ".ffn.lin2."),
                (r"\.output\.LayerNorm\.", ".output_layer_norm."),
                (r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")]


def hf_to_ours(name):
    name = re.sub(r"^(bert|distilbert)\.", "", name)
    for pat, rep in BERT_RENAMES:
        name = re.sub(pat, rep, name)
    return name


def read_json_file(path, fix):
    """The JSON object in `path`; invalid JSON, or JSON that is not an object, is a UserError
    ending in `fix`. Used by load_pretrained for config.json and tokenizer_config.json."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--pretrained {path.parent}: {path.name} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"--pretrained {path.parent}: {path.name} holds a JSON {type(obj).__name__}, not an "
                        f"object; {fix}")
    return obj


def load_pretrained(folder, n_labels):
    """(Encoder with the checkpoint's weights, Tokenizer, description). Missing and unexpected
    keys are reported; a shape mismatch is a UserError naming the tensor."""
    d = Path(folder)
    if not (d / "config.json").is_file():
        raise UserError(f"--pretrained {d}: no config.json there (a Hugging Face model folder is needed)")
    if not (d / "vocab.txt").is_file():
        raise UserError(f"--pretrained {d}: no vocab.txt there (a WordPiece vocabulary is needed)")
    try:
        cfg = read_json_file(d / "config.json", "download it again (it gives the model's shapes)")
        kind = cfg.get("model_type", "bert")
        if kind == "distilbert":
            shape = dict(n_layers=cfg["n_layers"], dim=cfg["dim"], n_heads=cfg["n_heads"],
                         hidden_dim=cfg["hidden_dim"], max_pos=cfg["max_position_embeddings"], type_vocab=0, eps=1e-12)
        elif kind == "bert":  # BERT and its same-shaped relatives (MiniLM, BioBERT, ...) say "bert"
            shape = dict(n_layers=cfg["num_hidden_layers"], dim=cfg["hidden_size"],
                         n_heads=cfg["num_attention_heads"], hidden_dim=cfg["intermediate_size"],
                         max_pos=cfg["max_position_embeddings"], type_vocab=cfg.get("type_vocab_size", 2),
                         eps=cfg.get("layer_norm_eps", 1e-12))
        else:
            raise UserError(f"--pretrained {d}: model_type {kind!r}; only bert and distilbert checkpoints are supported")
        vocab_size = int(cfg["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pretrained {d}: config.json is not a valid BERT/DistilBERT config ({type(e).__name__}: {e})")
    act = cfg.get("hidden_act", cfg.get("activation", "gelu"))
    if act != "gelu":
        raise UserError(f"--pretrained {d}: activation {act!r}; only BERT's exact gelu is implemented")
    try:  # one entry per "\n"-terminated line (str.splitlines would also split on \x1c, \u2028, ...)
        itos = (d / "vocab.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"--pretrained {d}: vocab.txt is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}); download it again, or save it as UTF-8")
    itos = [w.rstrip("\r") for w in itos]
    missing_specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in itos]
    if missing_specials or len(itos) > vocab_size:
        raise UserError(f"--pretrained {d}: vocab.txt " + (f"lacks {', '.join(missing_specials)}" if missing_specials
                        else f"has {len(itos)} entries, more than config.json's vocab_size {vocab_size}"))
    lower = True
    if (d / "tokenizer_config.json").is_file():
        lower = read_json_file(d / "tokenizer_config.json", "download it again, or delete it (only its "
                               "do_lower_case is read; the default is true)").get("do_lower_case", True)
    path = next((d / f for f in ("model.safetensors", "pytorch_model.bin") if (d / f).is_file()), None)
    if path is None:
        raise UserError(f"--pretrained {d}: neither model.safetensors nor pytorch_model.bin is there")
    try:
        weights = read_safetensors(path) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a Git LFS pointer, a truncated download, a pickled callable
        raise UserError(f"--pretrained {path}: not a readable weights file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150] if str(e) else ''}); download it again")
    if not isinstance(weights, dict) or not all(isinstance(t, torch.Tensor) for t in weights.values()):
        raise UserError(f"--pretrained {path}: holds a {type(weights).__name__}" + (" with non-tensor values" if
                        isinstance(weights, dict) else "") + ", not a state dict (tensor name -> tensor); "
                        "download the weights again, or save model.state_dict() there")
    shape["vocab_size"] = vocab_size
    model = Encoder(n_labels=n_labels, **shape)
    ours = model.state_dict()
    state, unexpected = {}, []
    for name, t in weights.items():
        key = hf_to_ours(name)
        if key not in ours or key.startswith(("pre_classifier.", "classifier.")):
            unexpected.append(name)  # e.g. the pooler, MLM heads, or another task's head
            continue
        if tuple(t.shape) != tuple(ours[key].shape):
            raise UserError(f"--pretrained {d}: {name} has shape {tuple(t.shape)}, the model from "
                            f"config.json expects {tuple(ours[key].shape)}")
        state[key] = t.to(torch.float32)
    missing = [k for k in ours if k not in state and not k.startswith(("pre_classifier.", "classifier."))]
    if "embeddings.word_embeddings.weight" not in state or not any(k.startswith("transformer.") for k in state):
        raise UserError(f"--pretrained {d}: none of its tensor names map to a BERT/DistilBERT encoder "
                        f"(e.g. {next(iter(weights), '-')}); is it another architecture?")
    model.load_state_dict(state, strict=False)
    desc = (f"{kind} from {d}: {shape['n_layers']} layers, dim {shape['dim']}, vocab {vocab_size}; "
            f"{len(state)} tensors loaded")
    return model, Tokenizer(itos, lower), desc, missing, unexpected


# -----------------------------------------------------------------------------
# built-in data: receipt / bank-statement line items for the seed's 8 categories
#
# Each item is a merchant or an item phrase, dressed the way statements print them: upper or
# mixed case, "*" and "#store" codes, abbreviations (PMT, SUBSCR), amounts in several formats,
# reference numbers and dates. Every text is unique, so no text is shared between splits.

RECEIPTS = {
    "Education": (["coursera", "udemy", "khan academy donation", "state university", "pearson", "chegg",
                   "duolingo", "masterclass", "kaplan", "scholastic book fair", "edx"],
                  ["tuition payment", "course fee", "textbook", "exam registration", "school supplies",
                   "online class", "lab fee", "student loan pmt", "workshop ticket", "language lessons",
                   "certification exam", "library fine", "school uniform", "tutoring session"]),
    "Entertainment": (["netflix.com", "spotify", "amc theatres", "steam games", "ticketmaster", "hulu",
                       "disney plus", "xbox live", "playstation network", "regal cinemas", "bowlero",
                       "audible"],
                      ["movie ticket", "concert tickets", "streaming subscr", "video game", "bowling night",
                       "museum admission", "theme park pass", "music album", "karaoke room", "comedy show",
                       "escape room", "arcade credits"]),
    "Food": (["starbucks", "mcdonald's", "chipotle", "whole foods", "trader joe's", "subway", "dominos",
              "uber eats", "doordash", "dunkin", "panera bread", "kfc", "safeway"],
             ["groceries", "coffee", "lunch", "dinner", "pizza delivery", "sandwich", "bakery", "burrito bowl",
              "breakfast", "fresh produce", "takeout", "snacks", "bagel", "sushi"]),
    "Healthcare": (["cvs pharmacy", "walgreens", "rite aid", "kaiser permanente", "labcorp", "quest diagnostics",
                    "smile dental", "vision center", "urgent care", "physio plus"],
                   ["prescription", "rx refill", "doctor visit copay", "dental cleaning", "eye exam",
                    "blood test", "vitamins", "physical therapy", "flu shot", "contact lenses", "first aid kit",
                    "allergy medicine", "hospital bill"]),
    "Housing": (["greystar", "oakwood apts", "home depot", "lowe's", "state farm", "allstate",
                 "ace hardware", "ikea"],
                ["rent payment", "mortgage pmt", "hoa dues", "renters insurance", "plumber repair",
                 "paint supplies", "furniture", "lawn care", "pest control", "lock replacement", "security deposit",
                 "property tax", "home insurance"]),
    "Shopping": (["amazon mktp", "target", "walmart", "best buy", "macy's", "old navy", "zara", "h&m",
                  "etsy", "ebay", "nordstrom", "costco"],
                 ["clothing", "shoes", "headphones", "phone case", "jeans", "gift card", "backpack",
                  "kitchen gadget", "laptop charger", "jacket", "sunglasses", "toys", "household items"]),
    "Transportation": (["uber", "lyft", "shell", "chevron", "exxonmobil", "bp", "amtrak", "delta air",
                        "united airlines", "metro transit", "greyhound", "hertz", "parkwhiz"],
                       ["ride", "trip", "gas", "fuel", "train ticket", "bus pass", "parking", "toll",
                        "car wash", "oil change", "flight", "taxi fare", "car rental", "tire repair"]),
    "Utilities": (["con edison", "pg&e", "comcast xfinity", "verizon wireless", "at&t", "t-mobile",
                   "duke energy", "city water dept", "national grid", "spectrum"],
                  ["electric bill", "water bill", "internet service", "phone bill", "gas utility",
                   "trash collection", "sewer charge", "cable tv", "mobile plan", "energy bill",
                   "heating oil"]),
}
ABBREV = {"payment": "pmt", "subscription": "subscr", "purchase": "purch", "service": "svc",
          "transaction": "txn", "monthly": "mthly"}


def receipt_item(rng, cat):
    merchants, items = RECEIPTS[cat]
    m, it = rng.choice(merchants), rng.choice(items)
    amount = rng.choice([f"{rng.uniform(1, 300):.2f}", f"${rng.uniform(1, 300):.2f}",
                         f"USD {rng.uniform(1, 300):.2f}", f"{rng.randint(1, 2000)}.00"])
    shape = rng.random()
    if shape < 0.3:
        text = f"{m.upper()} *{it.upper().replace(' ', '')} {amount}"
    elif shape < 0.55:
        text = f"{m.title()} - {it} {amount}"
    elif shape < 0.7:
        text = f"POS {m.upper()} #{rng.randint(100, 9999)} {rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
    elif shape < 0.85:
        text = f"{rng.choice(['Purchase', 'Payment', 'Monthly', 'Transaction'])}: {it} at {m.title()}"
    else:
        text = f"{it.capitalize()} {amount} ref {rng.randint(10000, 99999)}"
    if rng.random() < 0.3:  # statement abbreviations
        text = " ".join(ABBREV.get(w.lower(), w) for w in text.split())
    return text


def generate_items(n_train, seed):
    """Unique (text, label) items: n_train train, 15% each of n_train / 0.7 for val and test,
    stratified (labels drawn uniformly). Unique texts = no text shared between splits."""
    rng = random.Random(seed)
    n_total = round(n_train / 0.7)
    seen, items = set(), []
    while len(items) < n_total:
        cat = rng.choice(CATEGORIES)
        text = receipt_item(rng, cat)
        if text.lower() not in seen:
            seen.add(text.lower())
            items.append((text, cat))
    return stratified_split(items, seed, n_train / n_total)


def stratified_split(items, seed, train_frac):
    """Per label: shuffle, first train_frac to train, the rest halved into val and test."""
    rng = random.Random(seed)
    splits = ([], [], [])
    for label in sorted({l for _, l in items}):
        group = [it for it in items if it[1] == label]
        rng.shuffle(group)
        a = round(len(group) * train_frac)
        b = a + (len(group) - a) // 2
        splits[0].extend(group[:a])
        splits[1].extend(group[a:b])
        splits[2].extend(group[b:])
    for s in splits:
        rng.shuffle(s)
    return splits


def read_data(path, flag, bad_rows, log):
    """(text, label) rows of a CSV/TSV/JSONL file with columns text,label (common.read_records)."""
    rows, bad, reasons = common.read_records(path, flag, ("text", "label"), bad_rows=bad_rows)
    if bad:
        log(f"{flag} {path}: {bad} bad rows skipped (first: {'; '.join(reasons)})")
    if not rows:
        raise UserError(f"{flag} {path}: no rows with both text and label")
    return [(r["text"], r["label"]) for r in rows]


# -----------------------------------------------------------------------------
# metrics and charts

def trim(batch):
    """Cut the padding columns no row of this batch uses: receipt items are ~10 tokens, so a
    batch padded to --max-len 64 would spend most of its attention and FFN work on [PAD]."""
    L = int(batch["mask"].sum(1).max())
    return dict(batch, ids=batch["ids"][:, :L], mask=batch["mask"][:, :L])


def classify(model, ids, mask, device, amp_dtype, bs=128):
    """Softmax probabilities (N, labels) for pre-tokenized rows, `bs` rows at a time."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for i in range(0, len(ids), bs):
                b = trim({"ids": ids[i:i + bs], "mask": mask[i:i + bs]})
                with common.autocast(device, amp_dtype):
                    logits = model(b["ids"].to(device), b["mask"].to(device))
                out.append(logits.float().softmax(-1).cpu())
    finally:  # also after an out-of-memory error: the retry (evaluate_halving) must not train without dropout
        model.train(was_training)
    return torch.cat(out)


def report(probs, y, labels):
    """Accuracy, macro/weighted F1, per-class precision/recall/F1, confusion matrix, confidence."""
    n = len(labels)
    pred = probs.argmax(-1)
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)  # rows: true, columns: predicted
    tp = cm.diag().double()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    support = cm.sum(1).double()
    return {"accuracy": (pred == y).double().mean().item(), "macro_f1": f1.mean().item(),
            "weighted_f1": (f1 * support).sum().item() / support.sum().item(),
            "mean_confidence": probs.max(-1).values.mean().item(),
            "per_class": {l: {"precision": round(precision[i].item(), 4), "recall": round(recall[i].item(), 4),
                              "f1": round(f1[i].item(), 4), "support": int(support[i])} for i, l in enumerate(labels)},
            "confusion_matrix": cm.tolist()}


def charts(out, labels, train_labels, history, test):
    """The four PNGs in <out>/visualizations/ (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    d = Path(out) / "visualizations"
    d.mkdir(exist_ok=True)
    counts = [train_labels.count(l) for l in labels]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(labels, counts, color="#4C72B0")
    ax.bar_label(bars)
    ax.set_title("training items per category")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(d / "category_distribution.png", dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    a1.plot(ep, [h["train_loss"] for h in history], marker="o")
    a1.set(title="training loss", xlabel="epoch")
    a2.plot(ep, [h["val_acc"] for h in history], marker="o", color="#55A868")
    a2.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1))
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(d / "training_progress.png", dpi=100)
    plt.close(fig)

    cm = torch.tensor(test["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test split)")
    fig.tight_layout()
    fig.savefig(d / "confusion_matrix.png", dpi=100)
    plt.close(fig)

    names = ["accuracy", "precision (macro)", "recall (macro)", "F1 (macro)"]
    pc = test["per_class"].values()
    vals = [test["accuracy"], sum(c["precision"] for c in pc) / len(labels),
            sum(c["recall"] for c in pc) / len(labels), test["macro_f1"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names[::-1], vals[::-1], color=["#55A868" if v > 0.8 else "#C44E52" for v in vals[::-1]])
    for i, v in enumerate(vals[::-1]):
        ax.text(min(v, 0.88) + 0.01, i, f"{v:.1%}", va="center")
    ax.set(xlim=(0, 1), title=f"test results: {'ready' if vals[0] > 0.8 else 'needs more training'}")
    fig.tight_layout()
    fig.savefig(d / "summary_card.png", dpi=100)
    plt.close(fig)
    return d


# -----------------------------------------------------------------------------
# predict from a run folder

def load_run(out, args):
    """Model + tokenizer + labels from a run folder's best.pt (the model the summary reports),
    else its newest checkpoint, or --resume PATH."""
    state, path = common.load_run_model(out, "--out", "classifier", "extra", resume=args.resume)
    x = state.get("extra", {})
    if "labels" not in x:
        raise UserError(f"{path} is not a train_classifier.py checkpoint")
    model = build_model(x["shape"], len(x["labels"]))
    if x["lora"]:
        add_lora(model, x["lora"]["targets"], x["lora"]["r"], x["lora"]["alpha"], x["lora"]["dropout"])
    model.load_state_dict(state["model"])
    tok = (NgramTokenizer if x["shape"].get("kind") == "fasttext" else Tokenizer)(x["itos"], x["lower"])
    return model, tok, x["labels"], x["max_len"], path


def run_predict(args):
    if not args.out:
        raise UserError("--predict/--predict-file need --out RUN (a run folder with checkpoints)")
    model, tok, labels, max_len, path = load_run(Path(args.out), args)
    if args.merge:
        merge_lora(model)
    if args.predict_file:
        p = Path(args.predict_file)
        if not p.is_file():
            raise UserError(f"--predict-file {p}: file not found")
        try:
            texts = [l.strip() for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
        except UnicodeDecodeError:
            raise UserError(f"--predict-file {p}: not UTF-8 text; save it as UTF-8")
        if not texts:
            raise UserError(f"--predict-file {p}: no non-empty lines")
    else:
        texts = [args.predict]
    ids, mask = tok.encode(texts, max_len)
    probs = classify(model, ids, mask, torch.device("cpu"), None)
    print(f"model {path}")
    for text, p in zip(texts, probs):
        top = p.topk(min(3, len(labels)))
        print(f"{labels[top.indices[0]]:<15} {text}")
        print("    " + "  ".join(f"{labels[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    return 0


# -----------------------------------------------------------------------------

def legacy_model_key(args, sources):
    """An optimal_config.json "model" key (the flag's old name) sets --preset, unless a flag or a
    "preset" key already did; args.json then records preset alone."""
    value, source = vars(args).pop("model"), sources.pop("model")
    if value is None or sources["preset"] != "default":
        return
    if value not in PRESETS:
        raise UserError(f"--config {args.config}: classifier.model = {value!r} is invalid (not one of "
                        f"{', '.join(PRESETS)}); regenerate it with `python memory_optimizer.py config`")
    args.preset, sources["preset"] = value, source


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, sources = common.resolve_settings(parser, argv)
    legacy_model_key(args, sources)
    if args.predict is not None or args.predict_file is not None:
        return run_predict(args)
    targets = list(dict.fromkeys(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    if not targets or any(t not in LORA_NAMES for t in targets):
        raise UserError(f"--lora-targets {args.lora_targets}: use a comma list of {','.join(LORA_NAMES)}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"--lora-dropout {args.lora_dropout}: must be in [0, 1)")
    if args.full_finetune and args.lora:
        raise UserError("--full-finetune and --lora contradict each other; pick one")
    if args.full_finetune and not args.pretrained:
        raise UserError("--full-finetune only applies with --pretrained (from scratch every weight trains anyway)")
    if args.merge and not (args.lora or (args.pretrained and not args.full_finetune)):
        raise UserError("--merge folds LoRA adapters; this run has none (use it with --pretrained or --lora)")
    if (args.val_data or args.test_data) and not args.data:
        raise UserError("--val-data/--test-data need --data (the training CSV)")
    fasttext = args.preset == "fasttext" and not args.pretrained
    if fasttext and args.lora:
        raise UserError("--lora wraps transformer layers; fasttext has none (add --preset small)")
    if args.max_len < 3:
        raise UserError(f"--max-len {args.max_len}: needs room for [CLS], one token and [SEP]; use 3 or more")
    if sources["epochs"] == "default":
        # seed (pretrained DistilBERT): --quick 1 epoch, default 3. A random encoder needs more:
        # measured on the built-in data, 1 epoch gives ~35% test accuracy, 3 epochs ~99%.
        # fasttext: FASTTEXT_EPOCHS, measured on real data (docs/real-data.md)
        args.epochs = (1 if args.quick else PRETRAINED_EPOCHS) if args.pretrained else \
            (FASTTEXT_EPOCHS // 2 if args.quick else FASTTEXT_EPOCHS) if fasttext else (3 if args.quick else 5)
        sources["epochs"] = "auto"
    if not (math.isfinite(args.linear_c) and args.linear_c >= 0):
        raise UserError(f"--linear-c {args.linear_c:g}: must be 0 (off) or a positive number")
    if not fasttext and args.linear_c and sources["linear_c"] != "default":
        raise UserError("--linear-c sets the regression beside fasttext; this run trains a transformer (drop it)")
    if fasttext and args.pooling:
        raise UserError("--pooling chooses what a transformer's head reads; fasttext always averages (drop it)")
    if sources["pooling"] == "default" and not fasttext:
        args.pooling, sources["pooling"] = ("mean" if args.pretrained else "cls"), "auto"
    if sources["vocab_size"] == "default":
        args.vocab_size, sources["vocab_size"] = (200_000 if fasttext else 8000), "auto"

    # -- data (validated before the run folder is touched)
    common.fetch_data(args, ("data", "val_data", "test_data"), print, exts=common.RECORD_EXTS)
    if args.data:
        train_rows = read_data(args.data, "--data", args.bad_rows, print)
        val_rows = read_data(args.val_data, "--val-data", args.bad_rows, print) if args.val_data else None
        test_rows = read_data(args.test_data, "--test-data", args.bad_rows, print) if args.test_data else None
        desc = f"{args.data}"
        if val_rows is None and test_rows is None:
            train_rows, val_rows, test_rows = stratified_split(train_rows, args.seed, 0.7)
            desc += " (validation and test split off it: 15% each, stratified by label)"
        elif val_rows is None or test_rows is None:
            # the split no file gives is held out of --data: 15%, stratified by label
            train_rows, a, b = stratified_split(train_rows, args.seed, 0.85)
            val_rows, test_rows = (a + b, test_rows) if val_rows is None else (val_rows, a + b)
            desc += f" ({'validation' if args.test_data else 'test'} split off it: 15%, stratified by label)"
    else:
        train_rows, val_rows, test_rows = generate_items(args.train_size, args.seed)
        desc = "built-in receipt items"
    labels = sorted({l for _, l in train_rows})
    for rows, flag in ((val_rows, "--val-data"), (test_rows, "--test-data")):
        unknown = sorted({l for _, l in rows} - set(labels))
        if unknown:
            raise UserError(f"{flag}: label(s) {', '.join(unknown)} never occur in the training data; "
                            "fix the labels or add training rows for them")
    if len(labels) < 2 or not val_rows or not test_rows:
        raise UserError("the data needs at least 2 labels and non-empty validation and test splits "
                        f"(got {len(labels)} labels, {len(val_rows)} val, {len(test_rows)} test rows)")

    # -- model and tokenizer (user mistakes in --pretrained surface here, before any write)
    rank, world, local_rank = common.ddp_env(args)
    out, dev, state, resumed_from, notes = common.open_run(args, sources)
    common.check_world_size(state, resumed_from, world)
    if args.pretrained:
        model, tok, model_desc, missing, unexpected = load_pretrained(args.pretrained, len(labels))
        shape = dict(n_layers=len(model.transformer.layer), dim=model.pre_classifier.in_features,
                     n_heads=model.transformer.layer[0].n_heads,
                     hidden_dim=model.transformer.layer[0].ffn.lin1.out_features,
                     max_pos=model.embeddings.position_embeddings.num_embeddings,
                     type_vocab=getattr(model.embeddings, "token_type_embeddings", nn.Embedding(0, 1)).num_embeddings,
                     eps=model.embeddings.LayerNorm.eps, vocab_size=model.embeddings.word_embeddings.num_embeddings,
                     pooling=args.pooling)
        model.pooling = args.pooling
        if missing:
            notes.append(f"warning: missing in the checkpoint (left at random init): {', '.join(missing)}")
        if unexpected:
            notes.append(f"not used from the checkpoint: {', '.join(unexpected[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    elif fasttext:
        itos = state["extra"]["itos"] if state else \
            build_ngram_vocab([t for t, _ in train_rows], args.vocab_size, args.max_len)
        tok = NgramTokenizer(itos)
        if state and sources["linear_c"] == "default":  # a resumed run keeps its regression (older runs: none)
            args.linear_c, sources["linear_c"] = state["extra"]["shape"].get("linear", 0.0), "checkpoint"
        shape = dict(PRESETS["fasttext"], vocab_size=len(itos))
        if args.linear_c:  # no key without it: the shape of runs from before the regression
            shape["linear"] = args.linear_c
        model = FastText(n_labels=len(labels), **shape)
        model_desc = f"fasttext from scratch, {len(itos):,} word / bigram / character n-grams from the training data"
    else:
        itos = state["extra"]["itos"] if state else build_vocab([t for t, _ in train_rows], args.vocab_size)
        tok = Tokenizer(itos)
        shape = dict(PRESETS[args.preset], max_pos=max(PRESETS[args.preset]["max_pos"], args.max_len),
                     vocab_size=len(itos), pooling=args.pooling)
        model = Encoder(n_labels=len(labels), **shape)
        model_desc = f"{args.preset} from scratch, vocabulary {len(itos)} built from the training data"
    if args.max_len > shape.get("max_pos", args.max_len):  # fasttext has no positions
        raise UserError(f"--max-len {args.max_len}: the model has only {shape['max_pos']} positions")
    use_lora = (args.pretrained and not args.full_finetune) or args.lora
    if use_lora:
        add_lora(model, targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    if state:
        was = state.get("extra", {})
        now_lora = {"targets": targets, "r": args.lora_r, "alpha": args.lora_alpha,
                    "dropout": args.lora_dropout} if use_lora else None
        changed = [name for name, a, b in (("labels", was.get("labels"), labels), ("model shape", was.get("shape"), shape),
                                           ("LoRA settings", was.get("lora"), now_lora),
                                           ("--max-len", was.get("max_len"), args.max_len)) if a != b]
        if changed:
            raise UserError(f"{resumed_from} was trained with other {', '.join(changed)}; use the same flags, "
                            "a new --out, or --no-resume")
    if args.lr is None:  # LoRA / scratch need a larger step than full fine-tuning of pretrained weights
        args.lr, sources["lr"] = (5e-5 if args.pretrained and not use_lora else LORA_LR if args.pretrained else
                                  FASTTEXT_LR if fasttext else 1e-3), "auto"

    log, status, stop = common.start_ranks(out, args, "classifier", "val_acc", notes, rank, world, dev[0])
    try:
        with common.recording_failures(out, status) if rank == 0 else contextlib.nullcontext():
            return train(args, sources, out=out, log=log, status=status, stop=stop, dev=dev, state=state,
                         resumed_from=resumed_from, model=model, tok=tok, shape=shape, model_desc=model_desc,
                         lora_targets=use_lora and targets, labels=labels, rows=(train_rows, val_rows, test_rows),
                         data_desc=desc, rank=rank, world=world, local_rank=local_rank)
    finally:
        common.end_ranks(world)


# -----------------------------------------------------------------------------
# training: setup helpers, then train() with the loop

def encode_splits(tok, rows, labels, max_len):
    """Pre-tokenize every split once (seed: tokenization out of the training loop):
    {"train"|"val"|"test": {"ids": (N, T), "mask": (N, T), "y": (N,)}}."""
    lab = {l: i for i, l in enumerate(labels)}
    splits = {}
    for name, split_rows in zip(("train", "val", "test"), rows):
        ids, mask = tok.encode([t for t, _ in split_rows], max_len)
        splits[name] = {"ids": ids, "mask": mask, "y": torch.tensor([lab[l] for _, l in split_rows])}
    return splits


def loss_fn(model, mb, device):
    """Summed cross-entropy over the micro-batch and its row count (common.train_step divides by
    the rows of the whole accumulated batch)."""
    logits = model(mb["ids"].to(device, non_blocking=True), mb["mask"].to(device, non_blocking=True))
    return F.cross_entropy(logits.float(), mb["y"].to(device), reduction="sum"), len(mb["y"])


def rows_batch(step, perm, size, data, rank=0, world=1):
    """Batch `step` of an epoch, for common.StepBatches: rows perm[step*size:(step+1)*size] of a
    pre-tokenized split (under torchrun this rank's slice of them), padding trimmed. A module
    function, so it pickles for loader workers under the spawn start method (Windows, macOS); a
    lambda in train() did not."""
    idx = common.rank_slice(perm[step * size:(step + 1) * size], rank, world).tolist()
    return trim({k: v[idx] for k, v in data.items()})


def loader_settings(args, sources, device):
    """The loader's workers and pin_memory, where neither optimal_config.json nor
    --resource-efficient set them."""
    if sources["workers"] == "default":  # seed: min(2, cores // 2) on CPU; more on CUDA
        cores = os.cpu_count() or 1
        args.workers = min(4, cores) if device.type == "cuda" else min(2, max(1, cores // 2))
        sources["workers"] = "auto"
    if sources["pin_memory"] == "default":
        args.pin_memory, sources["pin_memory"] = device.type == "cuda", "auto"  # pinning helps GPU copies only


def log_setup(log, args, *, device, prec_why, micro_bs, accum, world, bs_why, data_desc, splits, labels, model_desc,
              n_params, n_trainable, lora_targets):
    """The machine box, then one line each for the data, the model and what trains."""
    ram = __import__("psutil").virtual_memory()
    box = [f"CPU cores: {os.cpu_count() or 1}",
           f"RAM: {ram.total / 2**30:.1f} GB ({ram.available / 2**30:.1f} GB free)",
           f"CUDA available: {torch.cuda.is_available()}", f"device {device.type}, precision {args.precision} ({prec_why})",
           f"batch {micro_bs} x {accum} accumulation" + (f" x {world} processes" if world > 1 else "")
           + f" = {micro_bs * accum * world} ({bs_why})",
           f"data loader: {args.workers} workers, pin_memory {args.pin_memory}"]
    width = max(map(len, box)) + 2
    log("+" + "-" * width + "+\n" + "\n".join(f"| {b:<{width - 2}} |" for b in box) + "\n+" + "-" * width + "+")
    n = {name: len(s["y"]) for name, s in splits.items()}
    log(f"data: {data_desc}; {n['train']} train / {n['val']} val / {n['test']} test; {len(labels)} labels")
    log(f"model: {model_desc}")
    log(f"trainable parameters: {n_trainable:,} of {n_params:,} ({100 * n_trainable / n_params:.2f}%)"
        + (f"; LoRA r {args.lora_r}, alpha {args.lora_alpha:g} on {','.join(lora_targets)}" if lora_targets else
           "; every weight trains" if n_trainable == n_params else
           "; the rest is the TF-IDF regression beside fasttext, fitted before training"))


def build_optimizer(model, args, sources, *, n_train, E, log):
    """AdamW on the trainable weights; linear warmup min(50, steps/epoch // 2), then linear decay
    (seed). Returns (optimizer, scheduler, steps_per_epoch, total_steps)."""
    optimizer = common.make_optimizer([p for p in model.parameters() if p.requires_grad], args, lr=args.lr,
                                      weight_decay=0.01)
    steps_per_epoch = math.ceil(n_train / E)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = max(1, min(50, steps_per_epoch // 2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    if sources["log_every"] == "default":
        args.log_every = max(10, steps_per_epoch // 5)
    return optimizer, scheduler, steps_per_epoch, total_steps


def train(args, sources, *, out, log, status, stop, dev, state, resumed_from, model, tok, shape, model_desc,
          lora_targets, labels, rows, data_desc, rank=0, world=1, local_rank=0):
    device, amp_dtype, scaler, prec_why = dev
    is_main = rank == 0
    splits = encode_splits(tok, rows, labels, args.max_len)
    n_train = len(rows[0])
    model.to(device)
    if args.grad_checkpointing:
        model.grad_checkpointing = True
    n_params, n_trainable = common.count_params(model)

    def probe(bs):  # worst case: bs full-length rows
        worst = {k: v[:1].expand(bs, *v.shape[1:]).clone() for k, v in splits["train"].items()}
        worst["mask"][:] = True
        return common.probe_step(model, lambda m, mb: loss_fn(m, mb, device), worst, device, amp_dtype)
    resumed_bs = (state["micro_bs"], state["accum"]) if state else None
    micro_bs, accum, bs_why = common.choose_batch_size(args, sources, device, probe, log, resumed_bs)
    micro_bs, accum = common.agree_batch(micro_bs, accum, device, world)
    E = micro_bs * accum  # rows per rank per step
    G = E * world  # the global batch
    if 0 < n_train % G < world:
        raise UserError(f"--batch-size {E} x {world} processes: the last batch of each epoch would hold "
                        f"{n_train % G} of {n_train} rows, too few for every process; use another --batch-size")
    # -- precision: on a CPU, bf16 only where this model's own step is measured faster in it
    first = {k: v[:micro_bs] for k, v in splits["train"].items()}
    amp_dtype, why = common.measure_precision(
        args, sources, device, model, lambda dt: common.probe_step(model, lambda m, mb: loss_fn(m, mb, device),
                                                                   first, device, dt),
        log, state["args"]["precision"] if state else None)
    prec_why = why or prec_why
    loader_settings(args, sources, device)
    log_setup(log, args, device=device, prec_why=prec_why, micro_bs=micro_bs, accum=accum, world=world, bs_why=bs_why,
              data_desc=data_desc, splits=splits, labels=labels, model_desc=model_desc, n_params=n_params,
              n_trainable=n_trainable, lora_targets=lora_targets)
    optimizer, scheduler, steps_per_epoch, total_steps = build_optimizer(model, args, sources, n_train=n_train,
                                                                         E=G, log=log)
    longest = int(splits["train"]["mask"].sum(1).argmax())  # batches are trimmed to their longest row
    worst = trim({k: v[longest:longest + 1].expand(micro_bs, *v.shape[1:]).clone() for k, v in splits["train"].items()})
    plan = common.memory_plan(model, optimizer, common.activation_bytes(model, lambda m, mb: loss_fn(m, mb, device),
                                                                        worst, device, amp_dtype), micro_bs, world, log,
                              worst="the longest training row")
    if args.plan:
        return common.plan_only(out, status, log)
    if getattr(model, "linear", None) is not None and not state:  # a resumed run has it in the checkpoint
        fit_linear(model.linear, splits["train"], args.linear_c, log)

    # best: [validation accuracy, -validation loss] of the best evaluation: a tie in accuracy goes to the
    # lower loss (else a run whose first epoch is already perfect stops there, barely trained)
    step, epoch, pos, bad_epochs, ep_loss = 0, 0, 0, 0, [0.0, 0]
    best = best_at_epoch_start = [-1.0, -math.inf]
    wall_before, train_before, samples_before = common.restore_training_state(state, model, optimizer,
                                                                              scheduler, scaler)
    if state:
        step, epoch, pos, best, bad_epochs, ep_loss, best_at_epoch_start = (
            state[k] for k in ("step", "epoch", "pos", "best", "bad_epochs", "ep_loss", "best_at_epoch_start"))
        if not isinstance(best, list):  # a checkpoint from before ties were broken by the loss
            best, best_at_epoch_start = [best, -math.inf], [best_at_epoch_start, -math.inf]
        log(f"resumed from {resumed_from} (step {step}, epoch {epoch + 1}, batch {pos})")
    if is_main:
        common.truncate_metrics(out, step)  # records a killed run wrote after its last checkpoint
        common.write_args(out, args, sources, {"micro_batch": micro_bs, "grad_accum": accum, "effective_batch": E,
                                               "world_size": world, "global_batch": G, "precision": args.precision,
                                               "device": device.type, "lora": bool(lora_targets),
                                               "why": {"batch": bs_why, "precision": prec_why}})
    train_model, no_sync = common.ddp_wrap(model, device, world, local_rank)  # `model` stays the one we save
    extra = {"itos": tok.itos, "lower": tok.lower, "labels": labels, "shape": shape, "max_len": args.max_len,
             "lora": {"targets": lora_targets, "r": args.lora_r, "alpha": args.lora_alpha,
                      "dropout": args.lora_dropout} if lora_targets else None}

    def save(best_now=False):
        ckpt = common.training_state(
            model, optimizer, scheduler, scaler, step=step, epoch=epoch, pos=pos, best=best, bad_epochs=bad_epochs,
            ep_loss=ep_loss, best_at_epoch_start=best_at_epoch_start, micro_bs=micro_bs, accum=accum, world_size=world,
            # totals over every segment of a run that was stopped and resumed
            wall_s=wall_before + time.time() - status["started"], train_s=train_before + time.time() - t_start,
            samples=samples_before + seen, args=dict(vars(args)), extra=extra)
        path = common.save_checkpoint(out, step, ckpt, args.keep, protect=resumed_from, best=best_now, log=log)
        common.update_status(out, status, last_checkpoint=str(path.resolve()))

    # -- the loop: one evaluation per epoch (and every --eval-every steps), early stopping
    watch = common.memory_watch(args)
    if is_main:
        common.update_status(out, status, state="running", total_steps=total_steps, step=step)
    t_start, seen, start_step, val_acc = time.time(), 0, step, None
    peak = common.TensorPeak(device, model, optimizer)  # the peak of the largest batches, beside the plan
    eval_bs = 128  # rows per evaluation batch; halved for good after an out-of-memory error
    bar = common.progress_bar(total_steps, step) if is_main else None
    model.train()
    stopped_early = bad_epochs >= args.patience  # a resumed run that had already stopped early
    while step < total_steps and (args.max_steps or epoch < args.epochs) and not stopped_early:
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        batches = common.StepBatches(rows_batch, perm=perm, size=G, data=splits["train"], rank=rank,
                                     world=world)  # item i: this rank's share of batch i of the epoch
        loader = torch.utils.data.DataLoader(
            batches, batch_size=None, sampler=range(pos, steps_per_epoch), worker_init_fn=common.quiet_worker,
            num_workers=args.workers, pin_memory=args.pin_memory,
            # its own generator: a loader seeds its workers from the global RNG otherwise, which
            # would shift the dropout stream of a run resumed mid-epoch
            generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for batch in loader:
            # rows of the whole global batch: DDP's average of the ranks' gradients is then the
            # 1-process gradient, though the last batch of an epoch splits unevenly
            n_global = min(G, n_train - pos * G)
            common.seed_rank_step(args.seed, step, rank, world)
            with peak.measure(batch["ids"].numel()):  # a step with the largest batch yet
                loss, n, micro_bs = common.train_step(train_model, optimizer, scaler, batch,
                                                      lambda m, mb: loss_fn(m, mb, device), micro_bs, clip=args.clip,
                                                      device=device, amp_dtype=amp_dtype, log=log, no_sync=no_sync,
                                                      norm=n_global / world if world > 1 else None)
            if world > 1:  # the global batch's loss; an OOM halving holds for every rank
                loss, n = common.all_ranks(loss * n, "sum", device, world) / n_global, n_global
                micro_bs = int(common.all_ranks(micro_bs, "min", device, world))
            accum = math.ceil(E / micro_bs)
            scheduler.step()
            step, pos, seen = step + 1, pos + 1, seen + n
            ep_loss = [ep_loss[0] + loss * n, ep_loss[1] + n]
            common.check_memory(watch, device, log)
            if is_main:
                bar.update(1)
            if is_main and (step % args.log_every == 0 or step == total_steps):
                sps = seen / max(1e-9, time.time() - t_start)
                mem = common.memory_snapshot(device)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{val_acc:.3f}" if val_acc is not None else "-",
                                sps=f"{sps:.0f}", refresh=False)
                common.append_metrics(out, {"step": step, "epoch": epoch + 1, "loss": round(loss, 6),
                                            "lr": scheduler.get_last_lr()[0]})
                eta = (total_steps - step) * (time.time() - t_start) / (step - start_step)
                common.update_status(out, status, step=step, epoch=epoch + 1, loss=round(loss, 5),
                                     samples_per_s=round(sps, 1), eta_s=round(eta), **mem)
            end_of_epoch = pos == steps_per_epoch
            is_best = False
            if (args.eval_every and step % args.eval_every == 0) or end_of_epoch or step == total_steps:
                v = {k: common.rank_slice(t, rank, world) for k, t in splits["val"].items()}  # this rank's share
                probs, eval_bs = common.evaluate_halving(
                    lambda bs: classify(model, v["ids"], v["mask"], device, amp_dtype, bs), eval_bs, device, log)
                n_val = len(splits["val"]["y"])
                val_acc = common.all_ranks(int((probs.argmax(-1) == v["y"]).sum()), "sum", device, world) / n_val
                val_loss = common.all_ranks(F.nll_loss(probs.clamp(min=1e-12).log(), v["y"], reduction="sum").item(),
                                            "sum", device, world) / n_val
                is_best = [val_acc, -val_loss] > best
                best = max(best, [val_acc, -val_loss])
                rec = {"step": step, "epoch": epoch + 1, "val_acc": round(val_acc, 4), "val_loss": round(val_loss, 5)}
                if end_of_epoch:
                    rec["train_loss"] = round(ep_loss[0] / max(1, ep_loss[1]), 5)
                    # an epoch is good if any evaluation in it (not only the last) beat the best so far
                    bad_epochs = 0 if best > best_at_epoch_start else bad_epochs + 1
                    best_at_epoch_start = best
                if is_main:
                    common.append_metrics(out, rec)
                    log(f"epoch {epoch + 1} step {step}: val accuracy {val_acc:.3f}, val loss {val_loss:.4f}"
                        + (" (best)" if is_best else ""))
                    common.update_status(out, status, metric=round(val_acc, 4))
            if end_of_epoch:
                epoch, pos, ep_loss = epoch + 1, 0, [0.0, 0]
                if bad_epochs >= args.patience:
                    log(f"early stopping: no better validation accuracy for {bad_epochs} epochs")
                    stopped_early = True
            saved = step % args.save_every == 0 or end_of_epoch or is_best or step == total_steps
            if saved and is_main:
                save(is_best)
            if saved:
                common.barrier(world)  # no rank runs ahead of a checkpoint being written
            why = common.stop_requested(stop, out)
            if common.all_ranks(bool(why), "max", device, world):  # every rank stops at the same step
                if not saved and is_main:
                    save()
                log(f"stopped by {why or 'another rank'} at step {step}; re-run the same command to resume")
                if is_main:
                    common.update_status(out, status, state="stopped", step=step)
                    bar.close()
                return 0
            if stopped_early or step >= total_steps:
                break
    if not is_main:
        return 0  # rank 0 alone tests and exports
    bar.close()

    if step == start_step and (out / "summary.json").exists():
        log(f"this run had already finished at step {step}: {out / 'summary.json'} is unchanged")
        # a kill while the exports were written (or a deleted one) left them missing or older
        # than the weights they come from: write them again, from the same weights
        source = load_best(model, out, log) or Path(resumed_from)
        names = [n for n in export_names(lora_targets) if not (out / n).is_file()
                 or (out / n).stat().st_mtime < source.stat().st_mtime]
        if names:
            write_exports(model, args, out=out, extra=extra, lora_targets=lora_targets, names=names)
            log(f"rebuilt {', '.join(names)} from {source} (missing, or older than it)")
        common.update_status(out, status, state="finished", eta_s=0, metric_name="test_acc")
        return 0
    test_and_export(model, args, out=out, log=log, status=status, splits=splits, rows=rows, labels=labels,
                    extra=extra, lora_targets=lora_targets, device=device, amp_dtype=amp_dtype, eval_bs=eval_bs,
                    run=dict(
                        best_val_accuracy=round(best[0], 4), steps=step, epochs=epoch, effective_batch=E,
                        linear_c=shape.get("linear", 0.0) if shape.get("kind") == "fasttext" else None,
                        world_size=world, global_batch=G,
                        **common.memory_figures(plan, peak, optimizer, args),
                        samples_per_s=round(
                            (samples_before + seen) / max(1e-9, train_before + time.time() - t_start), 1)),
                    params=(n_params, n_trainable), wall_before=wall_before)
    return 0


def load_best(model, out, log):
    """Load best.pt into `model` (the model the summary reports; seed: the best by validation
    accuracy) and return its path; None when it is missing or unreadable: `model` keeps the
    weights it has (the last step's). Used by train() for a finished run, test_and_export."""
    best_path = out / "checkpoints" / "best.pt"
    try:
        model.load_state_dict(common.load_checkpoint(best_path)["model"])
        return best_path
    except FileNotFoundError:
        return None
    except Exception as e:
        log(f"warning: {best_path} is unreadable ({type(e).__name__}); using the last step's weights")
        return None


def export_names(lora_targets):
    """The files write_exports writes. Used by train() for a finished run."""
    return (["adapter.pt"] if lora_targets else []) + ["model.pt"]


def write_exports(model, args, *, out, extra, lora_targets, names=None):
    """<out>/adapter.pt (LoRA runs: the adapter + head alone, small) and <out>/model.pt (every
    weight; LoRA folded in with --merge, which changes `model` in place), each to a temp file,
    then os.replace: a kill leaves the old file or the new one. names: only those.
    Used by test_and_export; train() rebuilds what a kill lost."""
    exports = {}
    if lora_targets:
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        exports["adapter.pt"] = {"adapter": {k: v for k, v in model.state_dict().items() if k in trainable},
                                 "extra": extra}
    export = merge_lora(model) if (args.merge and lora_targets) else model
    exports["model.pt"] = {"model": export.state_dict(),
                           "extra": dict(extra, lora=None if args.merge else extra["lora"])}
    for name, obj in exports.items():
        if names is not None and name not in names:
            continue
        tmp = out / (name + ".tmp")  # a kill leaves only this behind; prepare_run_dir deletes it
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())  # else a crash after os.replace can leave an empty file
            os.replace(tmp, out / name)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            if not common.disk_full(e):
                raise
            raise UserError(f"--out {out}: the disk is full writing {name}; free some space and re-run the same "
                            "command (it writes the exports again)") from None


def test_and_export(model, args, *, out, log, status, splits, rows, labels, extra, lora_targets, device, amp_dtype,
                    eval_bs, run, params, wall_before):
    """After the loop: the test split with the best checkpoint, the exports, then summary.json
    (so a run with a summary has its exports), and the charts. `run`: the loop's summary fields."""
    load_best(model, out, log)
    t = splits["test"]
    probs, _ = common.evaluate_halving(lambda bs: classify(model, t["ids"], t["mask"], device, amp_dtype, bs),
                                       eval_bs, device, log)
    test = report(probs, t["y"], labels)
    wall = wall_before + time.time() - status["started"]
    history = [r for r in common.read_metrics(out) if "train_loss" in r]
    summary = dict(trainer="classifier", metric="test_accuracy", value=round(test["accuracy"], 4),
                   macro_f1=round(test["macro_f1"], 4), weighted_f1=round(test["weighted_f1"], 4),
                   mean_confidence=round(test["mean_confidence"], 4), **run,
                   peak_mem_mb=common.peak_memory_mb(device), params=params[0], trainable_params=params[1],
                   wall_s=round(wall, 1), labels=labels, per_class=test["per_class"],
                   confusion_matrix=test["confusion_matrix"])
    write_exports(model, args, out=out, extra=extra, lora_targets=lora_targets)
    common.write_summary(out, **summary)
    viz = charts(out, labels, [l for _, l in rows[0]], history, test)

    log(f"test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, mean confidence "
        f"{test['mean_confidence']:.3f} ({len(rows[2])} items)")
    log(f"{'label':<16}{'precision':>10}{'recall':>8}{'f1':>8}{'n':>6}")
    for l, c in test["per_class"].items():
        log(f"{l:<16}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>8.3f}{c['support']:>6}")
    log(f"done in {wall:.0f}s: summary {out / 'summary.json'}; "
        + (f"charts {viz}" if viz else "charts skipped (pip install matplotlib)")
        + (f"; adapter {out / 'adapter.pt'} ({(out / 'adapter.pt').stat().st_size / 2**20:.1f} MB)" if lora_targets else ""))
    common.update_status(out, status, state="finished", step=run["steps"], metric=round(test["accuracy"], 4),
                         eta_s=0, metric_name="test_acc")


if __name__ == "__main__":
    common.run_main(main)
