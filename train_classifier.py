"""train_classifier.py -- sort receipt / expense items (or any short texts) into categories, in
plain PyTorch: a fastText-style n-gram model, a transformer encoder, LoRA; no transformers, no
peft. Every step is in this file.

    python train_classifier.py --quick --out runs/c                    # laptop CPU: fasttext + SVM, ~10 s
    python train_classifier.py --data train.csv --test-data test.csv --out runs/mine   # validation split off train
    python train_classifier.py --pretrained ~/models/all-MiniLM-L6-v2 --data train.csv --out runs/m   # LoRA
    python train_classifier.py --predict "UBER *TRIP 12.50" --out runs/c   # or --predict-file items.txt

The default model, fasttext (the mean of an item's word, bigram and character n-gram embeddings, then a linear
layer), sits beside a linear SVM on the TF-IDF of the same n-grams, their probabilities averaged: on 3,200 real
rows it is level with scikit-learn's best TF-IDF + LinearSVC and beats real fastText (docs/classifier.md).
--pretrained DIR (a local Hugging Face BERT/DistilBERT folder) freezes the encoder and trains LoRA (r 16, alpha
32 on q and v, as the seed) and the head: level with peft's LoRA and full fine-tuning on the same rows, in less
time. A re-run resumes its --out."""

import collections
import contextlib
import functools
import json
import math
import os
import random
import re
import string
import struct
import sys
import time
import types
import unicodedata
import warnings
from pathlib import Path

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError

CATEGORIES = ["Education", "Entertainment", "Food", "Healthcare", "Housing", "Shopping", "Transportation", "Utilities"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# measured on real data (docs/real-data.md); --quick: fasttext half the epochs, --pretrained 1
FASTTEXT_EPOCHS, FASTTEXT_LR = 10, 5e-3  # from scratch
SVM_SCALE = 10  # the SVM's probabilities beside fasttext: softmax(10 x its scores) (docs/classifier.md)
PRETRAINED_EPOCHS, LORA_LR = 4, 1e-3  # --pretrained (epochs also for --full-finetune), LoRA
SCRATCH_EPOCHS = 5  # a transformer from scratch (--preset small/distilbert/bert); --quick 3
PRESETS = {  # name: (layers, dim, heads, ffn, positions, token types); fasttext: embedding width
    "fasttext": dict(kind="fasttext", dim=64),
    "small": dict(n_layers=4, dim=256, n_heads=4, hidden_dim=1024, max_pos=128, type_vocab=0),
    "distilbert": dict(n_layers=6, dim=768, n_heads=12, hidden_dim=3072, max_pos=512, type_vocab=0),
    "bert": dict(n_layers=12, dim=768, n_heads=12, hidden_dim=3072, max_pos=512, type_vocab=2),
}

# -----------------------------------------------------------------------------
# config

parser = common.make_parser(  # check_flags sets --epochs by model
    __doc__, trainer="classifier", epochs=None, lr=None, effective_batch=16, save_every=50, keep=2,
    epochs_help=f"passes over the training data (default: by preset: fasttext {FASTTEXT_EPOCHS}, "
                f"small/distilbert/bert {SCRATCH_EPOCHS}, --pretrained {PRETRAINED_EPOCHS}; with --quick "
                f"{FASTTEXT_EPOCHS // 2}, 3 and 1)")
g = parser.add_argument_group("classifier")
g.add_argument("--data", metavar="CSV", help="training CSV with columns text,label (default: built-in receipt items)")
g.add_argument("--val-data", metavar="CSV",
               help="validation CSV (default: 15%% of --data, split off stratified by label)")
g.add_argument("--test-data", metavar="CSV", help="test CSV (default: 15%% of --data, split off stratified by label)")
g.add_argument("--train-size", type=common.pos_int, default=840, metavar="N",
               help="built-in training items, about (stratified rounding); plus 15%% each for validation and test")
g.add_argument("--max-len", type=common.pos_int, default=64, help="tokens per item, [CLS]/[SEP] included (fasttext: "
               "words per item)")
g.add_argument("--preset", "--model", dest="preset", choices=list(PRESETS), default="fasttext",
               help="model size when training from scratch (ignored with --pretrained): fasttext = mean of word, "
                    "bigram and character n-gram embeddings + a linear layer (won on small real data: "
                    "docs/real-data.md); small/distilbert/bert = transformer encoder shapes. --model: the old spelling")
# a flagless dest for the "model" key of optimal_config.json files from before --preset (check_flags reads it)
parser.set_defaults(model=None)
g.add_argument("--svm-c", type=common.nonneg_float, default=1.0, metavar="C",
               help="fasttext: a linear SVM on the same n-grams' TF-IDF (squared hinge, as scikit-learn's LinearSVC; "
                    "this is its C) beside it, their probabilities averaged (docs/classifier.md); 0 = fasttext alone")
g.add_argument("--pooling", choices=["cls", "mean"], help="what the head reads: [CLS], or the mean over tokens "
               "(default: mean with --pretrained, cls from scratch; measured: docs/real-data.md)")
g.add_argument("--pretrained", metavar="DIR",
               help="local Hugging Face BERT/DistilBERT folder to fine-tune (config.json, vocab.txt, weights)")
g.add_argument("--vocab-size", type=common.pos_int, help="vocabulary cap when it is built from the training data "
               "(default: 8000 word pieces for the transformers, 200000 n-grams for fasttext)")
g.add_argument("--lora-r", type=common.pos_int, default=16, help="LoRA rank")
g.add_argument("--lora-alpha", type=common.pos_float, default=32, help="LoRA scale numerator (scale = alpha/r)")
g.add_argument("--lora-dropout", type=float, default=0.1, help="dropout on the LoRA input")
g.add_argument("--lora-targets", default="q,v", help="comma list of q,k,v,o,ffn: linears that get adapters")
g.add_argument("--full-finetune", action="store_true", help="with --pretrained: train every weight instead of LoRA")
g.add_argument("--merge", action="store_true", help="fold LoRA into the base weights for the exported model.pt and "
               "for --predict")
g.add_argument("--patience", type=common.pos_int, default=3, help="early stopping: epochs without a better "
               "validation accuracy")
g.add_argument("--predict", metavar="TEXT", help="classify TEXT with the model in --out")
g.add_argument("--predict-file", metavar="FILE", help="classify every line of FILE")

# -----------------------------------------------------------------------------
# tokenizer: BERT's basic tokenizer + greedy longest-match-first WordPiece

def basic_tokenize(text, lower=True, keep=()):
    """Clean, lower-case, strip accents, split off punctuation and CJK chars; `keep` tokens ("[MASK]") stay whole."""
    if keep:
        parts = re.split("(" + "|".join(map(re.escape, keep)) + ")", text)
        return [w for p in parts for w in ([p] if p in keep else basic_tokenize(p, lower))]
    # as BERT's _clean_text: " \t\n\r" and category Zs become a space; other control, format,
    # private-use and unassigned characters (category C*) are dropped
    text = "".join(" " if c in "\t\n\r" or unicodedata.category(c) == "Zs" else c for c in text
                   if not (ord(c) in (0, 0xFFFD) or (unicodedata.category(c).startswith("C") and c not in "\t\n\r")))
    if lower:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")  # é -> e
    # punctuation (BERT's: every non-alphanumeric ASCII character, "$" and "*" too, and Unicode's P*
    # categories) and CJK characters are words of their own; then split on whitespace
    return "".join(f" {c} " if c in string.punctuation or unicodedata.category(c).startswith("P")
                   or 0x4E00 <= ord(c) <= 0x9FFF or 0x3400 <= ord(c) <= 0x4DBF or 0xF900 <= ord(c) <= 0xFAFF
                   else c for c in text).split()


def wordpiece(word, vocab, max_chars=100):
    """'unaffable' -> un ##aff ##able; a word with a piece missing from the vocabulary is one [UNK], as in BERT."""
    if len(word) > max_chars:
        return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start and (word[start:end] if start == 0 else "##" + word[start:end]) not in vocab:
            end -= 1
        if end == start:
            return ["[UNK]"]
        pieces.append(word[start:end] if start == 0 else "##" + word[start:end])
        start = end
    return pieces


class Tokenizer:
    def __init__(self, itos, lower=True):
        self.itos, self.lower = list(itos), lower
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.unk, self.cls, self.sep = (self.stoi[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"))
        self.keep = tuple(t for t in SPECIALS if t in self.stoi)

    def tokens(self, text):
        return [p for w in basic_tokenize(text, self.lower, self.keep)
                for p in ([w] if w in self.keep else wordpiece(w, self.stoi))]

    def encode(self, texts, max_len):
        """(N, max_len) ids and attention mask: [CLS] pieces [SEP] [PAD]..., cut to max_len."""
        ids = torch.full((len(texts), max_len), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            seq = [self.cls] + [self.stoi[p] for p in self.tokens(t)][:max_len - 2] + [self.sep]
            ids[i, :len(seq)] = torch.tensor(seq)
        return ids, ids != self.pad


def build_vocab(texts, cap):
    """Specials, each character seen (alone and as ##x: no alphabetic word is [UNK]), then words by frequency."""
    counts = collections.Counter(w for t in texts for w in basic_tokenize(t))
    chars = sorted(set("".join(counts)))
    base = SPECIALS + chars + ["##" + c for c in chars]
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in set(base)]
    return base + words[:max(0, cap - len(base))]


# fastText's features (Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification"; Bojanowski et
# al. 2017 for the character n-grams): the words, the word bigrams, and the character 3- to 5-grams of each
# word wrapped in < >, so "ssh" gives <ss ssh sh> and a rare or misspelt word still shares pieces with known
# ones. fastText hashes them into buckets; we keep an exact vocabulary of those seen in training, so none collide.

def ngrams(text, max_words):
    words = basic_tokenize(text)[:max_words]
    wrapped = ["<" + w + ">" for w in words]
    return words + [a + " " + b for a, b in zip(words, words[1:])] + \
        ["#" + w[i:i + n] for w in wrapped for n in (3, 4, 5) if len(w) > n for i in range(len(w) - n + 1)]


def build_ngram_vocab(texts, cap, max_words):
    """[PAD], then every n-gram of the training text by frequency (ties alphabetical), up to cap."""
    counts = collections.Counter(f for t in texts for f in ngrams(t, max_words))
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
# model: a BERT / DistilBERT-shaped encoder (post-LN, DistilBERT's parameter names), LoRA, fasttext

class LoRALinear(nn.Linear):
    """y = W0 x + (alpha/r) B(A(dropout(x))). W0 (and bias) frozen, A Kaiming-uniform, B zeros, so at start
    the layer is exactly W0 x. nn.Linear's weight/bias names: base checkpoints load into it unchanged."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.load_state_dict(base.state_dict())
        self.requires_grad_(False)
        self.scale = alpha / r
        self.lora_A = nn.Parameter(self.weight.new_empty(r, self.in_features))  # (r, in)
        self.lora_B = nn.Parameter(self.weight.new_zeros(self.out_features, r))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_drop = nn.Dropout(dropout)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scale * (self.lora_drop(x) @ self.lora_A.T @ self.lora_B.T)


LORA_NAMES = {"q": ["attention.q_lin"], "k": ["attention.k_lin"], "v": ["attention.v_lin"],
              "o": ["attention.out_lin"], "ffn": ["ffn.lin1", "ffn.lin2"]}


def add_lora(model, targets, r, alpha, dropout):
    """Wrap each block's target linears in LoRALinear; freeze all but them and the head, as the seed's PEFT config."""
    model.requires_grad_(False)
    for block in model.transformer.layer:
        for part, name in [p.split(".") for t in targets for p in LORA_NAMES[t]]:  # e.g. ("attention", "q_lin")
            setattr(getattr(block, part), name, LoRALinear(getattr(getattr(block, part), name), r, alpha, dropout))
    model.pre_classifier.requires_grad_(True)
    model.classifier.requires_grad_(True)
    return model


def merge_lora(model):
    """Replace every LoRALinear by the plain Linear it equals in eval mode, W0 + scale * B A (export, inference)."""
    for block in model.transformer.layer:
        for parent in (block.attention, block.ffn):
            for name, lora in [(n, c) for n, c in parent.named_children() if isinstance(c, LoRALinear)]:
                lin = nn.Linear(lora.in_features, lora.out_features, device=lora.weight.device, dtype=lora.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(lora.weight + lora.scale * lora.lora_B @ lora.lora_A)
                    lin.bias.copy_(lora.bias)  # every linear of the encoder has a bias
                setattr(parent, name, lin)
    return model


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
    [CLS] or the mean: pre_classifier Linear(d, d) -> ReLU -> Dropout(0.2) -> classifier Linear(d, labels)."""

    def __init__(self, vocab_size, n_labels, *, n_layers, dim, n_heads, hidden_dim, max_pos, type_vocab,
                 eps=1e-12, dropout=0.1, pooling="cls"):
        super().__init__()
        self.embeddings = e = nn.Module()
        e.word_embeddings = nn.Embedding(vocab_size, dim, padding_idx=0)
        e.position_embeddings = nn.Embedding(max_pos, dim)
        if type_vocab:
            e.token_type_embeddings = nn.Embedding(type_vocab, dim)
        e.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.transformer = nn.Module()
        self.transformer.layer = nn.ModuleList(Block(dim, n_heads, hidden_dim, eps, dropout) for _ in range(n_layers))
        self.pre_classifier, self.classifier = nn.Linear(dim, dim), nn.Linear(dim, n_labels)
        self.drop, self.head_drop = nn.Dropout(dropout), nn.Dropout(0.2)
        self.grad_checkpointing, self.pooling = False, pooling
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
    """The mean of an item's n-gram embeddings, then one linear layer (fastText's supervised model); an item with
    no known n-gram gets the bias alone. With svm=C (> 0) a linear SVM on the same n-grams sits beside it (fit_svm,
    then frozen); in eval mode the output is the log of the two models' averaged probabilities, their ensemble."""

    def __init__(self, vocab_size, n_labels, dim, kind="fasttext", svm=0.0):
        super().__init__()
        self.embeddings, self.classifier = nn.Embedding(vocab_size, dim, padding_idx=0), nn.Linear(dim, n_labels)
        nn.init.uniform_(self.embeddings.weight, -1 / dim, 1 / dim)  # fastText's init
        nn.init.zeros_(self.embeddings.weight[0])  # [PAD]
        self.linear = TfidfSVM(vocab_size, n_labels) if svm else None

    def forward(self, ids, mask):  # ids, mask (B, T) -> logits (B, labels)
        m = mask.unsqueeze(-1).to(self.embeddings.weight.dtype)  # (B, T, 1)
        h = (self.embeddings(ids) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, dim)
        logits = self.classifier(h)
        if self.linear is None or self.training:  # fastText trains on its own loss
            return logits
        return ((logits.float().softmax(-1) + (SVM_SCALE * self.linear(ids, mask)).softmax(-1)) / 2).log()


def term_counts(ids):
    """(B, T) -> (B, T): how often each position's id occurs in its row (tf). Equal ids are
    neighbours once sorted: count each run, then put the counts back in the row's order."""
    s, order = ids.sort(1)
    run = torch.cat([torch.zeros_like(s[:, :1]), (s[:, 1:] != s[:, :-1]).long()], 1).cumsum(1)  # (B, T)
    tf = torch.zeros_like(s).scatter_add_(1, run, torch.ones_like(s)).gather(1, run)  # sorted order
    return torch.empty_like(tf).scatter_(1, order, tf)


class TfidfSVM(nn.Module):
    """A one-vs-rest linear SVM (squared hinge, L2 penalty: scikit-learn's LinearSVC) on an item's TF-IDF vector of
    n-grams, the baseline a practitioner tries first. tf = the n-gram's count in the item, idf = ln((1 + N) / (1 +
    df)) + 1 over the N training items; words and bigrams, and character n-grams, are two blocks, each of unit
    length (scikit-learn's union of a word and a char_wb TfidfVectorizer; one joint length cost 0.7 points)."""

    def __init__(self, vocab_size, n_labels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(vocab_size, n_labels), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(n_labels), requires_grad=False)
        # fit_svm sets them; frozen parameters, not buffers, so that DDP does not re-send them every step
        self.idf = nn.Parameter(torch.ones(vocab_size), requires_grad=False)
        self.char = nn.Parameter(torch.zeros(vocab_size), requires_grad=False)  # 1: a character n-gram

    def tfidf(self, ids, mask):  # (B, T) -> (B, T): each position's share of its block's unit vector
        w, char = self.idf[ids] * mask, self.char[ids]  # an n-gram seen tf times adds tf * idf over its positions
        sq = term_counts(ids) * w * w  # |v|^2 = sum (tf idf)^2, per block
        norm = torch.where(char > 0, (sq * char).sum(1, keepdim=True), (sq * (1 - char)).sum(1, keepdim=True))
        return w / norm.sqrt().clamp(min=1e-12)

    def forward(self, ids, mask, weights=None):  # -> scores (B, labels), in fp32
        w = self.tfidf(ids, mask) if weights is None else weights
        offsets = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)[:-1]])  # rows in ids[mask]
        return F.embedding_bag(ids[mask], self.weight, offsets, per_sample_weights=w[mask].float(), mode="sum") \
            + self.bias


def fit_svm(svm, data, itos, C, log, history=100):
    """Fit the SVM beside fasttext on every training row at once by L-BFGS: its loss (the squared hinge of each class
    against the rest, summed, + |W|^2 / 2C, the bias unpenalised) is convex and smooth: one optimum. Deterministic."""
    t0 = time.time()
    ids, mask, y = (data[k].to(svm.weight.device) for k in ("ids", "mask", "y"))
    # df: in how many rows each n-gram occurs; each of its tf positions in a row adds 1 / tf
    df = torch.bincount(ids[mask], (1 / term_counts(ids))[mask].double(), minlength=len(svm.idf)).round().float()
    svm.idf.copy_(((1 + len(y)) / (1 + df)).log() + 1)
    svm.char.copy_(torch.tensor([f.startswith("#") for f in itos], dtype=torch.float32))  # ngrams() marks them
    w = svm.tfidf(ids, mask)  # (N, T), fixed while fitting
    sign = F.one_hot(y, svm.weight.shape[1]).float() * 2 - 1  # (N, labels): +1 its own class, -1 the others
    svm.requires_grad_(True)  # weight and bias train; idf and char, not in the graph (w is fixed), get no gradient
    # 2 x `history` vectors the size of the weights (vocab x labels); --resource-efficient keeps 10 (run-contract.md)
    # it stops at a gradient under 1e-5 (not at a loss that barely moves: the squared hinge flattens before then)
    opt = torch.optim.LBFGS([svm.weight, svm.bias], max_iter=300, tolerance_grad=1e-5, tolerance_change=0,
                            history_size=history, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (1 - sign * svm(ids, mask, w)).clamp(min=0).square().sum() + (svm.weight ** 2).sum() / (2 * C)
        loss.backward()
        return loss
    opt.step(closure)
    opt.zero_grad()
    svm.requires_grad_(False)
    with torch.no_grad():
        acc = (svm(ids, mask, w).argmax(-1) == y).float().mean().item()
    log(f"TF-IDF linear SVM beside fasttext (C {C:g}): fitted by L-BFGS in {time.time() - t0:.1f} s, "
        f"{opt.state[svm.weight]['n_iter']} iterations (history {history}), train accuracy {acc:.3f}")


# -----------------------------------------------------------------------------
# pretrained Hugging Face checkpoints: config.json, vocab.txt, safetensors or .bin

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
BERT_RENAMES = [  # HF BERT names -> ours (DistilBERT's); DistilBERT's own names only lose their prefix
    (r"^(bert|distilbert)\.", ""), (r"^encoder\.layer\.", "transformer.layer."),
    (r"\.attention\.self\.query\.", ".attention.q_lin."), (r"\.attention\.self\.key\.", ".attention.k_lin."),
    (r"\.attention\.self\.value\.", ".attention.v_lin."), (r"\.attention\.output\.dense\.", ".attention.out_lin."),
    (r"\.attention\.output\.LayerNorm\.", ".sa_layer_norm."), (r"\.intermediate\.dense\.", ".ffn.lin1."),
    (r"\.output\.dense\.", ".ffn.lin2."), (r"\.output\.LayerNorm\.", ".output_layer_norm."),
    (r"LayerNorm\.gamma$", "LayerNorm.weight"), (r"LayerNorm\.beta$", "LayerNorm.bias")]


def read_safetensors(path):
    """.safetensors: 8-byte little-endian header size, JSON header (name: dtype, shape, offsets), raw bytes; no code."""
    buf = bytearray(Path(path).read_bytes())
    (n,) = struct.unpack("<Q", buf[:8])
    tensors = {}
    for name, info in [(k, v) for k, v in json.loads(buf[8:8 + n]).items() if k != "__metadata__"]:
        (begin, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES[info["dtype"]]
        count = (end - begin) // torch.empty(0, dtype=dtype).element_size()
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=8 + n + begin) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    return tensors


def read_json_file(path, fix):
    """The JSON object in `path`; invalid JSON, or JSON that is not an object, is a UserError ending in `fix`."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--pretrained {path.parent}: {path.name} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"--pretrained {path.parent}: {path.name} holds a JSON {type(obj).__name__}, not an "
                        f"object; {fix}")
    return obj


def load_pretrained(folder, n_labels):
    """(Encoder with the checkpoint's weights, Tokenizer, its shape, description, missing keys, unexpected keys)."""
    d = Path(folder)
    for name, what in (("config.json", "a Hugging Face model folder"), ("vocab.txt", "a WordPiece vocabulary")):
        if not (d / name).is_file():
            raise UserError(f"--pretrained {d}: no {name} there ({what} is needed)")
    try:
        cfg = read_json_file(d / "config.json", "download it again (it gives the model's shapes)")
        kind = cfg.get("model_type", "bert")
        if kind == "distilbert":
            shape = dict(n_layers=cfg["n_layers"], dim=cfg["dim"], n_heads=cfg["n_heads"],
                         hidden_dim=cfg["hidden_dim"], max_pos=cfg["max_position_embeddings"], type_vocab=0, eps=1e-12)
        elif kind == "bert":  # BERT and its same-shaped relatives (MiniLM, BioBERT, ...) say "bert"
            shape = dict(n_layers=cfg["num_hidden_layers"], dim=cfg["hidden_size"], n_heads=cfg["num_attention_heads"],
                         hidden_dim=cfg["intermediate_size"], max_pos=cfg["max_position_embeddings"],
                         type_vocab=cfg.get("type_vocab_size", 2), eps=cfg.get("layer_norm_eps", 1e-12))
        else:
            raise UserError(f"--pretrained {d}: model_type {kind!r}; only bert and distilbert checkpoints are "
                            "supported")
        vocab_size = shape["vocab_size"] = int(cfg["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pretrained {d}: config.json is not a valid BERT/DistilBERT config "
                        f"({type(e).__name__}: {e})")
    if (act := cfg.get("hidden_act", cfg.get("activation", "gelu"))) != "gelu":
        raise UserError(f"--pretrained {d}: activation {act!r}; only BERT's exact gelu is implemented")
    try:  # one entry per "\n"-terminated line (str.splitlines would also split on \x1c, \u2028, ...)
        itos = [w.rstrip("\r") for w in (d / "vocab.txt").read_text(encoding="utf-8").removesuffix("\n").split("\n")]
    except UnicodeDecodeError as e:
        raise UserError(f"--pretrained {d}: vocab.txt is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                        f"{e.start}); download it again, or save it as UTF-8")
    missing_specials = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in itos]
    if missing_specials or len(itos) > vocab_size:
        raise UserError(f"--pretrained {d}: vocab.txt " + (f"lacks {', '.join(missing_specials)}" if missing_specials
                        else f"has {len(itos)} entries, more than config.json's vocab_size {vocab_size}"))
    lower = read_json_file(d / "tokenizer_config.json", "download it again, or delete it (only its do_lower_case is "
                           "read; the default is true)").get("do_lower_case", True) \
        if (d / "tokenizer_config.json").is_file() else True
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
    model = Encoder(n_labels=n_labels, **shape)
    ours, head = model.state_dict(), ("pre_classifier.", "classifier.")
    state, unexpected = {}, []
    for name, t in weights.items():
        key = functools.reduce(lambda k, rename: re.sub(*rename, k), BERT_RENAMES, name)
        if key not in ours or key.startswith(head):
            unexpected.append(name)  # e.g. the pooler, MLM heads, or another task's head
            continue
        if tuple(t.shape) != tuple(ours[key].shape):
            raise UserError(f"--pretrained {d}: {name} has shape {tuple(t.shape)}, the model from "
                            f"config.json expects {tuple(ours[key].shape)}")
        state[key] = t.to(torch.float32)
    if "embeddings.word_embeddings.weight" not in state or not any(k.startswith("transformer.") for k in state):
        raise UserError(f"--pretrained {d}: none of its tensor names map to a BERT/DistilBERT encoder "
                        f"(e.g. {next(iter(weights), '-')}); is it another architecture?")
    model.load_state_dict(state, strict=False)
    desc = (f"{kind} from {d}: {shape['n_layers']} layers, dim {shape['dim']}, vocab {vocab_size}; "
            f"{len(state)} tensors loaded")
    missing = [k for k in ours if k not in state and not k.startswith(head)]
    return model, Tokenizer(itos, lower), shape, desc, missing, unexpected


# -----------------------------------------------------------------------------
# data: built-in receipt / bank-statement line items for the seed's 8 categories, or the user's files
# Each item is a merchant or an item phrase, dressed the way statements print them: upper or
# mixed case, "*" and "#store" codes, abbreviations (PMT, SUBSCR), amounts in several formats,
# reference numbers and dates. Every text is unique, so no text is shared between splits.

RECEIPTS = {  # category: (merchants, item phrases), each "|"-separated
    "Education": ("coursera|udemy|khan academy donation|state university|pearson|chegg|duolingo|masterclass|kaplan|"
                  "scholastic book fair|edx",
                  "tuition payment|course fee|textbook|exam registration|school supplies|online class|lab fee|"
                  "student loan pmt|workshop ticket|language lessons|certification exam|library fine|school uniform|"
                  "tutoring session"),
    "Entertainment": ("netflix.com|spotify|amc theatres|steam games|ticketmaster|hulu|disney plus|xbox live|"
                      "playstation network|regal cinemas|bowlero|audible",
                      "movie ticket|concert tickets|streaming subscr|video game|bowling night|museum admission|"
                      "theme park pass|music album|karaoke room|comedy show|escape room|arcade credits"),
    "Food": ("starbucks|mcdonald's|chipotle|whole foods|trader joe's|subway|dominos|uber eats|doordash|dunkin|"
             "panera bread|kfc|safeway",
             "groceries|coffee|lunch|dinner|pizza delivery|sandwich|bakery|burrito bowl|breakfast|fresh produce|"
             "takeout|snacks|bagel|sushi"),
    "Healthcare": ("cvs pharmacy|walgreens|rite aid|kaiser permanente|labcorp|quest diagnostics|smile dental|"
                   "vision center|urgent care|physio plus",
                   "prescription|rx refill|doctor visit copay|dental cleaning|eye exam|blood test|vitamins|"
                   "physical therapy|flu shot|contact lenses|first aid kit|allergy medicine|hospital bill"),
    "Housing": ("greystar|oakwood apts|home depot|lowe's|state farm|allstate|ace hardware|ikea",
                "rent payment|mortgage pmt|hoa dues|renters insurance|plumber repair|paint supplies|furniture|"
                "lawn care|pest control|lock replacement|security deposit|property tax|home insurance"),
    "Shopping": ("amazon mktp|target|walmart|best buy|macy's|old navy|zara|h&m|etsy|ebay|nordstrom|costco",
                 "clothing|shoes|headphones|phone case|jeans|gift card|backpack|kitchen gadget|laptop charger|"
                 "jacket|sunglasses|toys|household items"),
    "Transportation": ("uber|lyft|shell|chevron|exxonmobil|bp|amtrak|delta air|united airlines|metro transit|"
                       "greyhound|hertz|parkwhiz",
                       "ride|trip|gas|fuel|train ticket|bus pass|parking|toll|car wash|oil change|flight|taxi fare|"
                       "car rental|tire repair"),
    "Utilities": ("con edison|pg&e|comcast xfinity|verizon wireless|at&t|t-mobile|duke energy|city water dept|"
                  "national grid|spectrum",
                  "electric bill|water bill|internet service|phone bill|gas utility|trash collection|sewer charge|"
                  "cable tv|mobile plan|energy bill|heating oil"),
}
ABBREV = {"payment": "pmt", "subscription": "subscr", "purchase": "purch", "service": "svc", "transaction": "txn",
          "monthly": "mthly"}


def generate_items(n_train, seed):
    """Unique (text, label) items: n_train train, 15% each of n_train / 0.7 for val and test,
    stratified (labels drawn uniformly). Unique texts = no text shared between splits."""
    rng, items = random.Random(seed), {}  # lower-cased text -> (text, label)
    while len(items) < round(n_train / 0.7):
        cat = rng.choice(CATEGORIES)
        merchants, phrases = (s.split("|") for s in RECEIPTS[cat])
        m, it = rng.choice(merchants), rng.choice(phrases)
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
        items.setdefault(text.lower(), (text, cat))
    return stratified_split(list(items.values()), seed, n_train / len(items))


def stratified_split(items, seed, train_frac):
    """Per label: shuffle, first train_frac to train, the rest halved into val and test."""
    rng, splits = random.Random(seed), ([], [], [])
    for label in sorted({l for _, l in items}):
        group = [it for it in items if it[1] == label]
        rng.shuffle(group)
        a = round(len(group) * train_frac)
        b = a + (len(group) - a) // 2
        for s, part in zip(splits, (group[:a], group[a:b], group[b:])):
            s.extend(part)
    for s in splits:
        rng.shuffle(s)
    return splits


def encode_splits(tok, rows, labels, max_len):
    """Every split tokenized once (seed): {"train"|"val"|"test": {"ids": (N, T), "mask": (N, T), "y": (N,)}}."""
    lab = {l: i for i, l in enumerate(labels)}
    return {name: dict(zip(("ids", "mask"), tok.encode([t for t, _ in split_rows], max_len)),
                       y=torch.tensor([lab[l] for _, l in split_rows]))
            for name, split_rows in zip(("train", "val", "test"), rows)}


def trim(batch):
    """Cut the padding columns no row of this batch uses: receipt items are ~10 tokens, so a
    batch padded to --max-len 64 would spend most of its attention and FFN work on [PAD]."""
    L = int(batch["mask"].sum(1).max())
    return dict(batch, ids=batch["ids"][:, :L], mask=batch["mask"][:, :L])


# -----------------------------------------------------------------------------
# main: check the flags, read the data, build the model, start the run

def check_flags(args, sources):
    """Refuse flags that cannot work; fill in measured defaults. Returns (the LoRA targets, whether it is fasttext)."""
    # an optimal_config.json "model" key (the old name) sets --preset unless a flag or "preset" key did
    model, source = vars(args).pop("model"), sources.pop("model")
    if model is not None and sources["preset"] == "default":
        if model not in PRESETS:
            raise UserError(f"--config {args.config}: classifier.model = {model!r} is invalid (not one of "
                            f"{', '.join(PRESETS)}); regenerate it with `python memory_optimizer.py config`")
        args.preset, sources["preset"] = model, source
    targets = list(dict.fromkeys(t.strip() for t in args.lora_targets.split(",") if t.strip()))
    fasttext = args.preset == "fasttext" and not args.pretrained
    for wrong, message in (
            (not targets or any(t not in LORA_NAMES for t in targets),
             f"--lora-targets {args.lora_targets}: use a comma list of {','.join(LORA_NAMES)}"),
            (not 0 <= args.lora_dropout < 1, f"--lora-dropout {args.lora_dropout}: must be in [0, 1)"),
            (args.full_finetune and not args.pretrained,
             "--full-finetune only applies with --pretrained (from scratch every weight trains anyway)"),
            (args.merge and not (args.pretrained and not args.full_finetune),
             "--merge folds LoRA adapters; this run has none (use it with --pretrained, without --full-finetune)"),
            ((args.val_data or args.test_data) and not args.data,
             "--val-data/--test-data need --data (the training CSV)"),
            (args.max_len < 3, f"--max-len {args.max_len}: needs room for [CLS], one token and [SEP]; use 3 or more"),
            (not fasttext and args.svm_c and sources["svm_c"] != "default",
             "--svm-c sets the SVM beside fasttext; this run trains a transformer (drop it)"),
            (fasttext and args.pooling,
             "--pooling chooses what a transformer's head reads; fasttext always averages (drop it)")):
        if wrong:
            raise UserError(message)
    if sources["epochs"] == "default":
        # seed (pretrained DistilBERT): --quick 1 epoch, default 3. A random encoder needs more (built-in data:
        # 1 epoch ~35% test accuracy, 3 epochs ~99%); fasttext: FASTTEXT_EPOCHS, measured on real data
        args.epochs, sources["epochs"] = ((1 if args.quick else PRETRAINED_EPOCHS) if args.pretrained else
                                          (FASTTEXT_EPOCHS // 2 if args.quick else FASTTEXT_EPOCHS) if fasttext else
                                          (3 if args.quick else SCRATCH_EPOCHS)), "auto"
    if sources["pooling"] == "default" and not fasttext:
        args.pooling, sources["pooling"] = ("mean" if args.pretrained else "cls"), "auto"
    if sources["vocab_size"] == "default":
        args.vocab_size, sources["vocab_size"] = (200_000 if fasttext else 8000), "auto"
    return targets, fasttext


def read_splits(args):
    """((train, val, test) rows, description): --data, with the splits no file gives cut off it; else built-in items."""
    if not (args.data or args.sha256):
        return generate_items(args.train_size, args.seed), "built-in receipt items"
    read_records = common.opt_in("records", "--data").read_records  # a user's file: only then is records.py needed
    common.fetch_data(args, ("data", "val_data", "test_data"), print, exts=common.RECORD_EXTS)
    splits = []
    for path, flag in ((args.data, "--data"), (args.val_data, "--val-data"), (args.test_data, "--test-data")):
        rows, bad, reasons = read_records(path, flag, ("text", "label"), bad_rows=args.bad_rows) if path else (0, 0, 0)
        if bad:
            print(f"{flag} {path}: {bad} bad rows skipped (first: {'; '.join(reasons)})")
        if path and not rows:
            raise UserError(f"{flag} {path}: no rows with both text and label")
        splits.append([(r["text"], r["label"]) for r in rows] if path else None)
    train, val, test = splits
    desc = f"{args.data}"
    if val is None and test is None:
        train, val, test = stratified_split(train, args.seed, 0.7)
        desc += " (validation and test split off it: 15% each, stratified by label)"
    elif val is None or test is None:  # the split no file gives is held out of --data: 15%, stratified by label
        train, a, b = stratified_split(train, args.seed, 0.85)
        val, test = (a + b, test) if val is None else (val, a + b)
        desc += f" ({'validation' if args.test_data else 'test'} split off it: 15%, stratified by label)"
    return (train, val, test), desc


def make_model(args, sources, *, state, resumed_from, labels, train_rows, targets, fasttext, notes, world):
    """(model, tokenizer, extra, description) as the flags ask, before any write; a resumed run's vocabulary and SVM
    from its checkpoint. extra: what a checkpoint records to rebuild them (a resumed one's must match). Sets --lr."""
    kind = lambda a: "--pretrained" if a.get("pretrained") else f"--preset {a.get('preset')}"  # noqa: E731
    if state and kind(state["args"]) != kind(vars(args)):  # another model kind's vocabulary: refused before it is read
        raise UserError(f"{resumed_from} was trained with {kind(state['args'])}, not {kind(vars(args))}: resume "
                        f"with {kind(state['args'])}, or use a new --out or --no-resume")
    if args.pretrained:
        model, tok, shape, desc, missing, unexpected = load_pretrained(args.pretrained, len(labels))
        shape["pooling"] = model.pooling = args.pooling
        # the new head starts as nn.Linear does (fan-in uniform), not BERT's N(0, 0.02): with --clip 0 below,
        # +0.59 +- 0.27 points over both old defaults on 10 tuning splits (docs/classifier.md)
        model.pre_classifier.reset_parameters()
        model.classifier.reset_parameters()
        if missing:
            notes.append(f"warning: missing in the checkpoint (left at random init): {', '.join(missing)}")
        if unexpected:
            notes.append(f"not used from the checkpoint: {', '.join(unexpected[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))
    elif fasttext:
        tok = NgramTokenizer(state["extra"]["itos"] if state else
                             build_ngram_vocab([t for t, _ in train_rows], args.vocab_size, args.max_len))
        if state and sources["svm_c"] == "default":  # a resumed run keeps its SVM (or has none)
            args.svm_c, sources["svm_c"] = state["extra"]["shape"].get("svm", 0.0), "checkpoint"
        shape = dict(PRESETS["fasttext"], vocab_size=len(tok.itos),  # no "svm" key without the SVM:
                     **({"svm": args.svm_c} if args.svm_c else {}))  # the shape of runs from before it
        model = FastText(n_labels=len(labels), **shape)
        if args.resource_efficient and world == 1 and "flag" not in (sources["optim"], sources["clip"]):
            # fastText's own updates are sparse: backward gives the rows of the n-gram table a batch uses, not a
            # dense table, and Adagrad keeps one state tensor, not AdamW's two (run-contract.md: peak tensors 0.58x
            # / 0.45x); clip_grad_norm_ takes no sparse tensor, and the gradient norm stayed under 0.44 (clip 1.0)
            model.embeddings.sparse, args.clip, sources["clip"] = True, 0.0, "resource-efficient"
        desc = f"fasttext from scratch, {len(tok.itos):,} word / bigram / character n-grams from the training data"
    else:
        tok = Tokenizer(state["extra"]["itos"] if state else build_vocab([t for t, _ in train_rows], args.vocab_size))
        shape = dict(PRESETS[args.preset], max_pos=max(PRESETS[args.preset]["max_pos"], args.max_len),
                     vocab_size=len(tok.itos), pooling=args.pooling)
        model = Encoder(n_labels=len(labels), **shape)
        desc = f"{args.preset} from scratch, vocabulary {len(tok.itos)} built from the training data"
    if args.max_len > shape.get("max_pos", args.max_len):  # fasttext has no positions
        raise UserError(f"--max-len {args.max_len}: the model has only {shape['max_pos']} positions")
    use_lora = bool(args.pretrained) and not args.full_finetune
    if use_lora:
        add_lora(model, targets, args.lora_r, args.lora_alpha, args.lora_dropout)
    extra = {"itos": tok.itos, "lower": tok.lower, "labels": labels, "shape": shape, "max_len": args.max_len,
             "lora": {"targets": targets, "r": args.lora_r, "alpha": args.lora_alpha,
                      "dropout": args.lora_dropout} if use_lora else None}
    was = state.get("extra", {}) if state else extra
    if "linear" in was.get("shape", {}):  # fasttext + a logistic regression, before the SVM
        raise UserError(f"{resumed_from} is from an older train_classifier.py (fasttext + a logistic regression, "
                        "since replaced by an SVM): start over with --no-resume or a new --out")
    changed = [name for name, key in (("labels", "labels"), ("model shape", "shape"), ("LoRA settings", "lora"),
                                      (f"--max-len ({was.get('max_len')}, not {args.max_len})", "max_len"))
               if was.get(key) != extra[key]]
    if changed:
        raise UserError(f"{resumed_from} was trained with other {', '.join(changed)}; use the same flags, "
                        "a new --out, or --no-resume")
    if args.lr is None:  # LoRA / scratch need a larger step than full fine-tuning of pretrained weights
        args.lr, sources["lr"] = ((LORA_LR if use_lora else 5e-5) if args.pretrained else
                                  FASTTEXT_LR if fasttext else 1e-3), "auto"
    if use_lora and sources["clip"] == "default":  # LoRA's gradient norm reaches 2-4: 1.0 acts, and cost points
        # (measured with the head's init above); a resumed run keeps its own clip (1.0 in runs from before)
        args.clip, sources["clip"] = (state["args"]["clip"], "checkpoint") if state else (0.0, "auto")
    return model, tok, extra, desc


def main(argv=None):
    args, sources = common.resolve_settings(parser, sys.argv[1:] if argv is None else argv, own_changes=[
        ("L-BFGS history", 100, 10, "the TF-IDF SVM's fit"),
        ("optim", "adamw", "adagrad", "fasttext: sparse embedding gradients, Adagrad at 10 x --lr, not clipped")])
    if args.eval_only and (args.predict is not None or args.predict_file is not None or args.no_resume):
        raise UserError("--eval-only scores the run's saved model on its validation and test data; drop "
                        "--predict/--predict-file/--no-resume (or --eval-only)")
    if args.predict is not None or args.predict_file is not None:
        return predict(args)
    targets, fasttext = check_flags(args, sources)
    rows, data_desc = read_splits(args)  # checked before the run folder is touched
    labels = sorted({l for _, l in rows[0]})
    for split, flag in zip(rows[1:], ("--val-data", "--test-data")):
        if unknown := sorted({l for _, l in split} - set(labels)):
            raise UserError(f"{flag}: label(s) {', '.join(unknown)} never occur in the training data; "
                            "fix the labels or add training rows for them")
    if len(labels) < 2 or not rows[1] or not rows[2]:
        raise UserError("the data needs at least 2 labels and non-empty validation and test splits "
                        f"(got {len(labels)} labels, {len(rows[1])} val, {len(rows[2])} test rows)")
    if args.eval_only:  # the same data flags give the same split; nothing but <out>/eval.json is written
        return eval_only(args, sources, rows=rows, data_desc=data_desc)
    ranks = common.process_group(args)
    out, (device, amp_dtype, scaler, prec_why), state, resumed_from, notes = common.open_run(args, sources)
    common.check_world_size(state, resumed_from, ranks.world)
    model, tok, extra, model_desc = make_model(args, sources, state=state, resumed_from=resumed_from, labels=labels,
                                               train_rows=rows[0], targets=targets, fasttext=fasttext, notes=notes,
                                               world=ranks.world)
    log, status, stop = ranks.start(out, args, "classifier", "val_acc", notes, device)
    # the run's context for train() and its helpers (icefall's `params`); state: the checkpoint resumed
    run = types.SimpleNamespace(out=out, log=log, status=status, stop=stop, ranks=ranks, device=device,
                                amp_dtype=amp_dtype, scaler=scaler, prec_why=prec_why, state=state,
                                resumed_from=resumed_from, tb=None)
    try:
        with common.recording_failures(out, status) if ranks.is_main else contextlib.nullcontext():
            return train(args, sources, run, model=model, tok=tok, extra=extra, model_desc=model_desc, rows=rows,
                         data_desc=data_desc)
    finally:  # the TensorBoard writer flushes its last events on every way out: finished, stopped, failed
        if run.tb is not None:
            run.tb.close()
        ranks.end()


# -----------------------------------------------------------------------------
# training: a step's loss, the batches, an evaluation, the optimizer, where the loop is; then train()

def loss_fn(model, mb, device):
    """Summed cross-entropy and the row count (train_step divides by the rows of the whole accumulated batch)."""
    logits = model(mb["ids"].to(device, non_blocking=True), mb["mask"].to(device, non_blocking=True))
    return F.cross_entropy(logits.float(), mb["y"].to(device), reduction="sum"), len(mb["y"])


def worst_batch(data, bs):
    """bs copies of the longest training row: no training batch of bs rows is larger (they are trimmed)."""
    longest = int(data["mask"].sum(1).argmax())
    return trim({k: v[longest:longest + 1].expand(bs, *v.shape[1:]).clone() for k, v in data.items()})


def rows_batch(step, perm, size, data, ranks):
    """Batch `step` of an epoch (this rank's slice of it), padding trimmed: a module function, so that
    common.StepBatches pickles for loader workers under the spawn start method (Windows, macOS)."""
    idx = ranks.slice(perm[step * size:(step + 1) * size]).tolist()
    return trim({k: v[idx] for k, v in data.items()})


def classify(model, ids, mask, device, amp_dtype, bs=128):
    """Softmax probabilities (N, labels) for pre-tokenized rows, `bs` rows at a time."""
    was_training, out = model.training, []
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, len(ids), bs):
                b = trim({"ids": ids[i:i + bs], "mask": mask[i:i + bs]})
                with common.autocast(device, amp_dtype):
                    out.append(model(b["ids"].to(device), b["mask"].to(device)).float().softmax(-1).cpu())
    finally:  # also after an out-of-memory error: the retry (evaluate_halving) must not train without dropout
        model.train(was_training)
    return torch.cat(out)


def val_figures(run, model, val, eval_bs):
    """(accuracy, loss, eval_bs) on the validation split, each rank its share, summed over the ranks."""
    v = {k: run.ranks.slice(t) for k, t in val.items()}
    probs, eval_bs = common.evaluate_halving(
        lambda bs: classify(model, v["ids"], v["mask"], run.device, run.amp_dtype, bs), eval_bs, run.device, run.log)
    n_val = len(val["y"])
    val_acc = run.ranks.all(int((probs.argmax(-1) == v["y"]).sum()), "sum") / n_val
    val_loss = run.ranks.all(F.nll_loss(probs.clamp(min=1e-12).log(), v["y"], reduction="sum").item(), "sum") / n_val
    return val_acc, val_loss, eval_bs


def validate(run, p, model, val, *, end_of_epoch, eval_bs):
    """val_figures; the best so far and early stopping's count in `p`; a metrics record; a log line."""
    val_acc, val_loss, eval_bs = val_figures(run, model, val, eval_bs)
    is_best = [val_acc, -val_loss] > p.best
    p.best = max(p.best, [val_acc, -val_loss])
    rec = {"step": p.step, "epoch": p.epoch + 1, "val_acc": round(val_acc, 4), "val_loss": round(val_loss, 5)}
    if end_of_epoch:
        rec["train_loss"] = round(p.ep_loss[0] / max(1, p.ep_loss[1]), 5)
        # an epoch is good if any evaluation in it (not only the last) beat the best so far
        p.bad_epochs = 0 if p.best > p.best_at_epoch_start else p.bad_epochs + 1
        p.best_at_epoch_start = p.best
    if run.ranks.is_main:
        common.append_metrics(run.out, rec, run.tb)
        run.log(f"epoch {p.epoch + 1} step {p.step}: val accuracy {val_acc:.3f}, val loss {val_loss:.4f}"
                + (" (best)" if is_best else ""))
        common.update_status(run.out, run.status, metric=round(val_acc, 4))
    return is_best, eval_bs


def log_setup(log, args, sources, model, *, device, data_desc, splits, extra, model_desc):
    """The loader's workers and pin_memory where nothing set them; a line each for machine, data, model, what trains."""
    n_params, n_trainable = common.count_params(model)
    if sources["workers"] == "default":  # seed: min(2, cores // 2) on CPU; more on CUDA
        n = os.cpu_count() or 1
        args.workers, sources["workers"] = min(4, n) if device.type == "cuda" else min(2, max(1, n // 2)), "auto"
    if sources["pin_memory"] == "default":
        args.pin_memory, sources["pin_memory"] = device.type == "cuda", "auto"  # pinning helps GPU copies only
    ram, lora = psutil.virtual_memory(), extra["lora"]
    log(f"CPU cores: {os.cpu_count() or 1} | RAM: {ram.total / 2**30:.1f} GB ({ram.available / 2**30:.1f} GB free) | "
        f"CUDA available: {torch.cuda.is_available()} | loader workers: {args.workers}, pin_memory {args.pin_memory}")
    n = {name: len(s["y"]) for name, s in splits.items()}
    log(f"data: {data_desc}; {n['train']} train / {n['val']} val / {n['test']} test; {len(extra['labels'])} labels")
    log(f"model: {model_desc}")
    log(f"trainable parameters: {n_trainable:,} of {n_params:,} ({100 * n_trainable / n_params:.2f}%)"
        + (f"; LoRA r {lora['r']}, alpha {lora['alpha']:g} on {','.join(lora['targets'])}, lr {args.lr:g}, "
           + (f"gradient clipping at {args.clip:g}" if args.clip else "no gradient clipping") if lora else
           "; every weight trains" if n_trainable == n_params else
           "; the rest is the TF-IDF SVM beside fasttext, fitted before training"))
    return n_params, n_trainable


def build_optimizer(model, args, sources, *, n_train, E, world, log):
    """AdamW on the trainable weights; linear warmup min(50, steps/epoch // 2), then linear decay (seed)."""
    G = E * world
    if 0 < n_train % G < world:
        raise UserError(f"--batch-size {E} x {world} processes: the last batch of each epoch would hold "
                        f"{n_train % G} of {n_train} rows, too few for every process; use another --batch-size")
    trainable = [p for p in model.parameters() if p.requires_grad]  # Adagrad: 10 x lr, measured (run-contract.md)
    warnings.filterwarnings("ignore", "Sparse invariant checks")  # torch's, from sparse Adagrad: not in the bar
    optimizer = torch.optim.Adagrad(trainable, lr=10 * args.lr) if isinstance(model, FastText) and \
        model.embeddings.sparse else common.make_optimizer(trainable, args, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(n_train / G)
    total_steps, warmup = args.max_steps or args.epochs * steps_per_epoch, max(1, min(50, steps_per_epoch // 2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total_steps - s) / max(1, total_steps - warmup))))
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    if sources["log_every"] == "default":
        args.log_every = max(10, steps_per_epoch // 5)
    return optimizer, scheduler, steps_per_epoch, total_steps


def loop_state(run, args, scheduler, *, n_train, G, steps_per_epoch, total_steps):
    """Where the loop is (a new run's start, or the resumed one's at a new global batch G): pos, batches of this
    epoch done; best, [val accuracy, -val loss]; bad_epochs, epochs in a row without a better; ep_loss, [sum, rows]."""
    p = types.SimpleNamespace(step=0, epoch=0, pos=0, best=[-1.0, -math.inf], bad_epochs=0, ep_loss=[0.0, 0],
                              best_at_epoch_start=[-1.0, -math.inf])
    if not run.state:
        return p
    p = types.SimpleNamespace(**{k: run.state[k] for k in vars(p)})
    if not isinstance(p.best, list):  # a checkpoint from before ties were broken by the loss
        p.best, p.best_at_epoch_start = [p.best, -math.inf], [p.best_at_epoch_start, -math.inf]
    run.log(f"resumed from {run.resumed_from} (step {p.step}, " + (
        f"epoch {p.epoch + 1}, {p.pos} batches into it)" if p.pos or not p.epoch else f"end of epoch {p.epoch})"))
    G0 = run.state["micro_bs"] * run.state["accum"] * run.ranks.world
    if G0 != G:  # a new effective batch typed on resume
        per_epoch = (math.ceil(n_train / G0), steps_per_epoch)
        p.step, p.pos = common.rebatch(scheduler, p.step, p.pos, per_epoch=per_epoch, log=run.log,
                                       total=(args.max_steps or args.epochs * per_epoch[0], total_steps))
    return p


def train(args, sources, run, *, model, tok, extra, model_desc, rows, data_desc):
    out, log, ranks, device, world = run.out, run.log, run.ranks, run.device, run.ranks.world
    # -- data: every split tokenized once; the model
    splits, n_train = encode_splits(tok, rows, extra["labels"], args.max_len), len(rows[0])
    model.to(device)
    model.grad_checkpointing = bool(args.grad_checkpointing)  # fasttext has no layers to recompute: a no-op there
    n_params, n_trainable = log_setup(log, args, sources, model, device=device, data_desc=data_desc, splits=splits,
                                      extra=extra, model_desc=model_desc)

    # -- fit the machine: the micro-batch (probed on the longest row), the precision, the memory plan
    step_loss, worst = functools.partial(loss_fn, device=device), functools.partial(worst_batch, splits["train"])
    micro_bs, accum, run.amp_dtype, why = common.fit_batch(
        model, step_loss, worst, args, sources, device=device, amp_dtype=run.amp_dtype, prec_why=run.prec_why,
        state=run.state, log=log, ranks=ranks, unit="items")
    E, G = micro_bs * accum, micro_bs * accum * world  # rows per rank per step; the global batch
    optimizer, scheduler, steps_per_epoch, total_steps = build_optimizer(model, args, sources, n_train=n_train, E=E,
                                                                         world=world, log=log)
    plan = common.memory_plan(args, model, optimizer, step_loss, worst(micro_bs), device=device,
                              amp_dtype=run.amp_dtype, world=world, log=log, worst="the longest training row")
    if args.plan:
        return common.plan_only(out, run.status, log)
    if getattr(model, "linear", None) is not None and not run.state:  # a resumed run has it in the checkpoint
        fit_svm(model.linear, splits["train"], tok.itos, args.svm_c, log, 10 if args.resource_efficient else 100)

    # -- resume
    wall_before, train_before, samples_before = common.restore_training_state(run.state, model, optimizer,
                                                                              scheduler, run.scaler)
    p = loop_state(run, args, scheduler, n_train=n_train, G=G, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if ranks.is_main:
        common.truncate_metrics(out, p.step)  # records a killed run wrote after its last checkpoint
        common.write_args(out, args, sources, {"micro_batch": micro_bs, "grad_accum": accum, "effective_batch": E,
                                               "world_size": world, "global_batch": G, "precision": args.precision,
                                               "device": device.type, "lora": bool(extra["lora"]), "why": why})
        common.update_status(out, run.status, state="running", total_steps=total_steps, step=p.step)
    run.tb = common.tensorboard(args, out) if ranks.is_main else None  # --tensorboard: <out>/tb
    train_model, no_sync = ranks.wrap(model)  # `model` stays the one we save

    # -- the loop: one evaluation per epoch (and every --eval-every steps), early stopping
    watch = common.memory_watch(args)
    t_start, seen, start_step, eval_bs = time.time(), 0, p.step, 128  # eval_bs: halved for good after an OOM
    bar = common.progress_bar(total_steps, p.step) if ranks.is_main else None
    stopped_early = p.bad_epochs >= args.patience  # a resumed run that had already stopped early
    while p.step < total_steps and (args.max_steps or p.epoch < args.epochs) and not stopped_early:
        # its own generator: a loader seeds its workers from the global RNG otherwise, which would
        # shift the dropout stream of a run resumed mid-epoch
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + p.epoch))
        loader = torch.utils.data.DataLoader(
            common.StepBatches(rows_batch, perm=perm, size=G, data=splits["train"], ranks=ranks), batch_size=None,
            sampler=range(p.pos, steps_per_epoch), num_workers=args.workers, pin_memory=args.pin_memory,
            worker_init_fn=common.quiet_worker, generator=torch.Generator().manual_seed(args.seed * 1000 + p.epoch))
        for batch in loader:
            # rows of the whole global batch: DDP's average of the ranks' gradients is then the
            # 1-process gradient, though the last batch of an epoch splits unevenly
            n_global = min(G, n_train - p.pos * G)
            ranks.seed_step(args.seed, p.step)
            with plan.measure(batch["ids"].numel()):  # a step with the largest batch yet
                loss, n, micro_bs = common.train_step(train_model, optimizer, run.scaler, batch, step_loss, micro_bs,
                                                      clip=args.clip, device=device, amp_dtype=run.amp_dtype, log=log,
                                                      no_sync=no_sync, norm=n_global / world if world > 1 else None)
            if world > 1:  # the global batch's loss; an OOM halving holds for every rank
                loss, n = ranks.all(loss * n, "sum") / n_global, n_global
                micro_bs = int(ranks.all(micro_bs, "min"))
            accum = math.ceil(E / micro_bs)
            scheduler.step()
            p.step, p.pos, seen = p.step + 1, p.pos + 1, seen + n
            p.ep_loss = [p.ep_loss[0] + loss * n, p.ep_loss[1] + n]
            common.check_memory(watch, device, log)
            if bar is not None:
                bar.update(1)
            if bar is not None and (p.step % args.log_every == 0 or p.step == total_steps):
                elapsed, lr = time.time() - t_start, scheduler.get_last_lr()[0]
                mem = common.log_step(log, p.step, total_steps, loss, lr, elapsed=elapsed, steps=p.step - start_step,
                                      items=seen, unit="items", device=device, tb=run.tb)
                common.append_metrics(out, {"step": p.step, "epoch": p.epoch + 1, "loss": round(loss, 6), "lr": lr})
                common.update_status(out, run.status, step=p.step, epoch=p.epoch + 1, loss=round(loss, 5),
                                     samples_per_s=round(seen / max(1e-9, elapsed), 1),
                                     eta_s=round((total_steps - p.step) * elapsed / (p.step - start_step)), **mem)
            end_of_epoch, is_best = p.pos == steps_per_epoch, False
            if (args.eval_every and p.step % args.eval_every == 0) or end_of_epoch or p.step == total_steps:
                is_best, eval_bs = validate(run, p, model, splits["val"], end_of_epoch=end_of_epoch, eval_bs=eval_bs)
            if end_of_epoch:
                p.epoch, p.pos, p.ep_loss = p.epoch + 1, 0, [0.0, 0]
                if p.bad_epochs >= args.patience:
                    log(f"early stopping: no better validation accuracy for {p.bad_epochs} epochs")
                    stopped_early = True
            why_stop = common.stop_requested(run.stop, out)
            stop = ranks.all(bool(why_stop), "max")  # every rank stops at the same step
            if p.step % args.save_every == 0 or end_of_epoch or is_best or p.step == total_steps or stop:
                if ranks.is_main:  # wall_s, train_s, samples: over every segment of a run stopped and resumed
                    ckpt = common.training_state(
                        model, optimizer, scheduler, run.scaler, **vars(p), micro_bs=micro_bs, accum=accum,
                        world_size=world, wall_s=wall_before + time.time() - run.status["started"],
                        train_s=train_before + time.time() - t_start, samples=samples_before + seen,
                        args=dict(vars(args)), extra=extra)
                    path = common.save_checkpoint(out, p.step, ckpt, args.keep, protect=run.resumed_from,
                                                  best=is_best, log=log)
                    common.update_status(out, run.status, last_checkpoint=str(path.resolve()))
                ranks.barrier()  # no rank runs ahead of a checkpoint being written
            if stop:
                log(f"stopped by {why_stop or 'another rank'} at step {p.step}; re-run the same command to resume")
                if ranks.is_main:
                    common.update_status(out, run.status, state="stopped", step=p.step)
                    bar.close()
                return 0
            if stopped_early or p.step >= total_steps:
                break
    if not ranks.is_main:
        return 0  # rank 0 alone tests and exports
    bar.close()

    # -- report: the test split with the best checkpoint, the exports, summary.json
    fields = dict(best_val_accuracy=round(p.best[0], 4), steps=p.step, epochs=p.epoch, effective_batch=E,
                  svm_c=extra["shape"].get("svm", 0.0) if extra["shape"].get("kind") == "fasttext" else None,
                  world_size=world, global_batch=G, **plan.figures(run.log),
                  samples_per_s=round((samples_before + seen) / max(1e-9, train_before + time.time() - t_start), 1))
    return finish(run, model, args, finished=p.step == start_step and (out / "summary.json").exists(), splits=splits,
                  rows=rows, extra=extra, eval_bs=eval_bs, fields=fields, params=(n_params, n_trainable),
                  wall_before=wall_before)


# -----------------------------------------------------------------------------
# after training: the test split, the exports, summary.json and the charts

def report(run, model, t, labels, eval_bs):
    """The test split `t` scored: accuracy, macro/weighted F1, per-label precision/recall/F1, confusions, confidence."""
    probs, _ = common.evaluate_halving(lambda bs: classify(model, t["ids"], t["mask"], run.device, run.amp_dtype, bs),
                                       eval_bs, run.device, run.log)
    y, n, pred = t["y"], len(labels), probs.argmax(-1)
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((y, pred), torch.ones_like(y), accumulate=True)  # rows: true, columns: predicted
    tp, support = cm.diag().double(), cm.sum(1).double()
    precision, recall = tp / cm.sum(0).clamp(min=1), tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"accuracy": (pred == y).double().mean().item(), "macro_f1": f1.mean().item(),
            "weighted_f1": (f1 * support).sum().item() / support.sum().item(),
            "mean_confidence": probs.max(-1).values.mean().item(),
            "per_class": {l: {"precision": round(precision[i].item(), 4), "recall": round(recall[i].item(), 4),
                              "f1": round(f1[i].item(), 4), "support": int(support[i])} for i, l in enumerate(labels)},
            "confusion_matrix": cm.tolist()}


def save_report(log, path, test, labels, **fields):
    """Print report()'s figures (the headline, then precision/recall/F1 per label) and write them to `path`
    (summary.json, --eval-only's eval.json): the headline, `fields`, then the per-label figures."""
    log(f"test accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, mean confidence "
        f"{test['mean_confidence']:.3f} ({sum(map(sum, test['confusion_matrix']))} items)")
    log(f"{'label':<16}{'precision':>10}{'recall':>8}{'f1':>8}{'n':>6}")
    for l, c in test["per_class"].items():
        log(f"{l:<16}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>8.3f}{c['support']:>6}")
    common.write_json_atomic(path, dict(
        trainer="classifier", metric="test_accuracy", value=round(test["accuracy"], 4),
        macro_f1=round(test["macro_f1"], 4), weighted_f1=round(test["weighted_f1"], 4),
        mean_confidence=round(test["mean_confidence"], 4), **fields, labels=labels, per_class=test["per_class"],
        confusion_matrix=test["confusion_matrix"]))


def charts(out, labels, train_labels, test):
    """The four PNGs in <out>/visualizations/ (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    d = Path(out) / "visualizations"
    d.mkdir(exist_ok=True)
    figs = {name: plt.subplots(1, n, figsize=size) for name, n, size in (
        ("category_distribution", 1, (9, 4)), ("training_progress", 2, (10, 4)), ("confusion_matrix", 1, (7, 6)),
        ("summary_card", 1, (7, 3.2)))}
    ax = figs["category_distribution"][1]
    ax.bar_label(ax.bar(labels, [train_labels.count(l) for l in labels], color="#4C72B0"))
    ax.set_title("training items per category")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    a1, a2 = figs["training_progress"][1]
    history = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"train_loss"' in l]
    a1.plot([h["epoch"] for h in history], [h["train_loss"] for h in history], marker="o")
    a1.set(title="training loss", xlabel="epoch")
    a2.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], marker="o", color="#55A868")
    a2.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1))
    for a in (a1, a2):
        a.grid(alpha=0.3)
    ax, cm = figs["confusion_matrix"][1], torch.tensor(test["confusion_matrix"])
    ax.imshow(cm, cmap="Blues")
    for i, j in [(i, j) for i in range(len(labels)) for j in range(len(labels))]:
        ax.text(j, i, int(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test split)")
    ax, pc = figs["summary_card"][1], test["per_class"].values()
    vals = {"F1 (macro)": test["macro_f1"], "recall (macro)": sum(c["recall"] for c in pc) / len(labels),
            "precision (macro)": sum(c["precision"] for c in pc) / len(labels), "accuracy": test["accuracy"]}
    ax.barh(list(vals), list(vals.values()), color=["#55A868" if v > 0.8 else "#C44E52" for v in vals.values()])
    for i, v in enumerate(vals.values()):
        ax.text(min(v, 0.88) + 0.01, i, f"{v:.1%}", va="center")
    ax.set(xlim=(0, 1), title=f"test results: {'ready' if test['accuracy'] > 0.8 else 'needs more training'}")
    for name, (fig, _) in figs.items():
        fig.tight_layout()
        fig.savefig(d / f"{name}.png", dpi=100)
        plt.close(fig)
    return d


def write_exports(model, args, *, out, extra, older_than=math.inf):
    """<out>/adapter.pt (LoRA runs: the adapter + head alone) and <out>/model.pt (every weight; LoRA folded in
    with --merge, in place), those missing or older than `older_than` (an mtime). Returns the names written."""
    names = [n for n in (["adapter.pt"] if extra["lora"] else []) + ["model.pt"]
             if not (out / n).is_file() or (out / n).stat().st_mtime < older_than]
    for name in names:
        if name == "adapter.pt":
            trainable = {k for k, p in model.named_parameters() if p.requires_grad}
            obj = {"adapter": {k: v for k, v in model.state_dict().items() if k in trainable}, "extra": extra}
        else:
            export = merge_lora(model) if args.merge and extra["lora"] else model
            obj = {"model": export.state_dict(), "extra": dict(extra, lora=None if args.merge else extra["lora"])}
        common.atomic_save(obj, out / name)  # a kill leaves the old file or the new one (and a .tmp: prepare_run_dir)
    return names


def finish(run, model, args, *, finished, splits, rows, extra, eval_bs, fields, params, wall_before):
    """With best.pt's weights (else the last step's): the test split, the exports, then summary.json (a run with a
    summary has its exports), the charts. A finished run re-run rebuilds only exports older than those weights."""
    out, log, labels = run.out, run.log, extra["labels"]
    source = out / "checkpoints" / "best.pt"
    try:
        model.load_state_dict(common.load_checkpoint(source)["model"])
    except Exception as e:
        if not isinstance(e, FileNotFoundError):
            log(f"warning: {source} is unreadable ({type(e).__name__}); using the last step's weights")
        source = run.resumed_from  # where the weights it has come from, in a run that had finished
    if finished:
        common.finished_before(out, run.status, fields["steps"], log)
        if names := write_exports(model, args, out=out, extra=extra, older_than=Path(source).stat().st_mtime):
            log(f"rebuilt {', '.join(names)} from {source} (missing, or older than it)")
        return 0
    test = report(run, model, splits["test"], labels, eval_bs)
    wall = wall_before + time.time() - run.status["started"]
    write_exports(model, args, out=out, extra=extra)
    save_report(log, out / "summary.json", test, labels, **fields, params=params[0], trainable_params=params[1],
                wall_s=round(wall, 1))
    viz = charts(out, labels, [l for _, l in rows[0]], test)
    adapter = out / "adapter.pt"
    log(f"done in {wall:.0f}s: summary {out / 'summary.json'}; "
        + (f"charts {viz}" if viz else "charts skipped (pip install matplotlib)")
        + (f"; adapter {adapter} ({adapter.stat().st_size / 2**20:.1f} MB)" if extra["lora"] else ""))
    common.update_status(out, run.status, state="finished", step=fields["steps"], metric=round(test["accuracy"], 4),
                         eta_s=0, metric_name="test_acc")
    return 0


# -----------------------------------------------------------------------------
# serving a trained run folder: --eval-only, --predict, --predict-file

def saved_model(out, resume):
    """(model, tokenizer, checkpoint, its path) of the run in `out`: its best.pt (the model the summary reports), else
    its newest checkpoint, or --resume PATH, rebuilt from the checkpoint's `extra` and weights."""
    state, path = common.load_run_model(out, "--out", "classifier", "extra", resume=resume)
    x = state["extra"]  # load_run_model checked that it is a classifier's
    fasttext = x["shape"].get("kind") == "fasttext"
    if "linear" in x["shape"]:  # fasttext + a logistic regression, before the SVM
        raise UserError("this checkpoint is from an older train_classifier.py; train again with --no-resume")
    model = (FastText if fasttext else Encoder)(n_labels=len(x["labels"]), **x["shape"])
    if x["lora"]:
        add_lora(model, x["lora"]["targets"], x["lora"]["r"], x["lora"]["alpha"], x["lora"]["dropout"])
    model.load_state_dict(state["model"])
    return model, (NgramTokenizer if fasttext else Tokenizer)(x["itos"], x["lower"]), state, path


def eval_only(args, sources, *, rows, data_desc):
    """--eval-only: the run's best.pt (the weights summary.json's best_val_accuracy and test figures came from), or
    --resume CKPT, on the splits this command's data flags give, in the precision its validation ran in. Prints the
    training run's figures again into <out>/eval.json; no checkpoint, status.json, metrics.jsonl or train.log."""
    out = Path(args.out) if args.out else common.newest_run("classifier")
    if out is None:
        raise UserError("--eval-only: no classifier run under runs/; pass --out RUN (a trained run folder)")
    model, tok, state, path = saved_model(out, args.resume)
    x, saved = state["extra"], state.get("args", {})
    if unknown := sorted({l for split in rows[1:] for _, l in split} - set(x["labels"])):
        raise UserError(f"--eval-only: label(s) {', '.join(unknown)} are not among the {len(x['labels'])} that "
                        f"{path} learnt; give the data flags of its training command")
    differs = [f"--{k.replace('_', '-')} {getattr(args, k)} (trained with {saved.get(k)})"
               for k in ("data", "val_data", "test_data", "seed") + (() if args.data else ("train_size",))
               if saved.get(k) != getattr(args, k)]
    same_rows = all(saved.get(k) == getattr(args, k) for k in ("data", "val_data", "test_data"))
    if same_rows and (saved.get("seed") != args.seed and not (args.val_data and args.test_data) if args.data else
                      saved.get("train_size") != args.train_size):  # the same rows split another way
        raise UserError(f"--eval-only: {', '.join(differs)}: those validation and test splits would hold rows {path} "
                        "trained on; repeat the training command's data flags")
    if differs:
        print(f"note: {', '.join(differs)}: the figures are for this data's validation and test splits")
    if sources["precision"] == "default":  # as its validation ran (fp16: CUDA's rule picks it again)
        args.precision = saved.get("precision") if saved.get("precision") in ("fp32", "bf16") else "auto"
    device, amp_dtype, _, _ = common.setup_device(args, sources)
    model.to(device)
    print(f"model {path} (step {state.get('step')}), device {device.type}, precision {args.precision}")
    print(f"data: {data_desc}; {len(rows[1])} val / {len(rows[2])} test")
    splits = encode_splits(tok, ([], rows[1], rows[2]), x["labels"], x["max_len"])  # no training rows needed
    ctx = types.SimpleNamespace(ranks=common.OneProcess(), device=device, amp_dtype=amp_dtype, log=print)
    val_acc, val_loss, eval_bs = val_figures(ctx, model, splits["val"], 128)  # 128: validate()'s first batch
    test = report(ctx, model, splits["test"], x["labels"], eval_bs)
    print(f"val accuracy {val_acc:.3f}, val loss {val_loss:.4f} ({len(rows[1])} items)")
    save_report(print, out / "eval.json", test, x["labels"], checkpoint=str(Path(path).resolve()),
                step=state.get("step"), val_accuracy=val_acc, val_loss=val_loss, n_val=len(rows[1]),
                n_test=len(rows[2]), data=data_desc, device=device.type, precision=args.precision)
    print(f"wrote {out / 'eval.json'}")
    return 0


def predict(args):
    """Classify --predict TEXT or each line of --predict-file with the model in --out (saved_model)."""
    if not args.out:
        raise UserError("--predict/--predict-file need --out RUN (a run folder with checkpoints)")
    model, tok, state, path = saved_model(Path(args.out), args.resume)
    x, labels = state["extra"], state["extra"]["labels"]
    if args.merge:
        merge_lora(model)
    texts = [args.predict]
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
    probs = classify(model, *tok.encode(texts, x["max_len"]), torch.device("cpu"), None)
    print(f"model {path}")
    for text, p in zip(texts, probs):
        top = p.topk(min(3, len(labels)))
        print(f"{labels[top.indices[0]]:<15} {text}")
        print("    " + "  ".join(f"{labels[i]} {v:.1%}" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    return 0


if __name__ == "__main__":
    common.run_main(main)
