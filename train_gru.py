"""train_gru.py -- CADENCE: a category-conditioned GRU query generator for e-commerce autosuggest.

After Anand et al., "CADENCE: Offline Category Constrained and Diverse Query Generation for
E-commerce Autosuggest" (KDD 2023). A word-level language model over search queries that sees
the query's category at every step, so "red run" in fashion completes to shoes, not to a pump.

    python train_gru.py --quick --out runs/q                      # laptop CPU, well under a minute
    python train_gru.py --dataset-size 20000 --epochs 8           # the seed's "extended" run
    python train_gru.py --data queries.csv --out runs/mine        # your data: columns text,category
    python benchmarks/bench_gru.py --make-data data/debian_gru    # real text: Debian descriptions by section
    python train_gru.py --data data/debian_gru/queries.csv --out runs/debian   # ~3 min on 2 CPU cores
    python train_gru.py --lr 1e-3 --epochs 3 --dropout 0.3        # the seed's lr, epochs and dropout
    python train_gru.py --suggest "red run" --category fashion --beam 5 --out runs/q
    python train_gru.py --quick --out runs/q --eval-only          # best.pt's figures again, to runs/q/eval.json
    python train_gru.py --preset original --quick                 # the seed's 3-layer GRU-MN, ~48M params

Re-running the same command resumes from the newest checkpoint in --out.
"""

import contextlib
import functools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
from common import UserError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
MAX_WORDS = 30  # seed: queries longer than this are cut

# -----------------------------------------------------------------------------
# config

# Defaults measured on real categorized text (docs/real-data.md "GRU on real categorized text": 3,200 Debian
# package descriptions, 8 sections as categories, `benchmarks/bench_gru.py --real`): the seed's
# lr 1e-3, 3 epochs, dropout 0.3 end at val perplexity 605 (blind 655); these at 357 (blind 438).
# lr 1e-3 is still falling after 10 epochs (435); lr 1e-2 overfits from epoch 2 (381 -> 946);
# at 3e-3, dropout 0.5 beats 0.3 (354 vs 376 at 8 epochs) and 12 epochs overfit (389). The seed's
# values stay one command line away: --lr 1e-3 --epochs 3 --dropout 0.3.
EPOCHS, QUICK_EPOCHS, LR, DROPOUT, SEED_DROPOUT = 8, 3, 3e-3, 0.5, 0.3
parser = common.make_parser(__doc__, trainer="gru", epochs=EPOCHS, lr=LR, effective_batch=64,
                            save_every=50, eval_every=0, log_every=10)
g = parser.add_argument_group("CADENCE GRU")
g.add_argument("--data", default=None, metavar="CSV",
               help="training data: CSV with columns text,category (default: built-in generator)")
g.add_argument("--dataset-size", type=common.pos_int, default=None, metavar="N",
               help="built-in queries to generate (default 5000 with --quick, else 10000)")
g.add_argument("--val-frac", type=float, default=0.1, help="share of queries held out for validation")
g.add_argument("--dropout", type=float, default=None, metavar="P",
               help=f"dropout (default: {DROPOUT} for --preset optimized, the seed's {SEED_DROPOUT}; "
                    "the paper's 0.8 for original)")
g.add_argument("--warmup", type=common.nonneg_int, default=None, metavar="N",
               help="linear warm-up steps before the cosine decay (default: a tenth of the run, at most 100)")
g.add_argument("--vocab-size", type=common.pos_int, default=10000,
               help="vocabulary cap, specials included (rarer words become <unk>)")
g.add_argument("--preset", choices=["optimized", "original"], default="optimized",
               help="optimized: 1-layer GRU 256 (~5M params at 10K words); original: the seed's "
                    "3-layer GRU-MN 2000/1500/1000 with attention over past states (~48M)")
g.add_argument("--suggest", default=None, metavar="PREFIX",
               help="print completions of PREFIX from the model in --out (no training); "
                    "a prefix not ending in a space treats its last word as partial")
g.add_argument("--category", default=None, help="category for --suggest")
g.add_argument("--beam", type=common.pos_int, default=5,
               help="--suggest: number of suggestions, each from its own beam of this width")
g.add_argument("--max-words", "--max-len", dest="max_words", type=common.pos_int, default=12,
               help="--suggest (and the suggestions logged after training): most words to generate. "
                    "--max-len is its deprecated old name (in train_classifier.py --max-len means tokens "
                    "per input item)")


# -----------------------------------------------------------------------------
# built-in data: e-commerce queries with categories
#
# Each category has product types (Zipf-weighted, so a few heads and a long tail, as in real
# query logs), brands and attribute facets, and query templates that combine them the way
# people type ("red running shoes for men", "samsung 55 inch smart tv under 40000").

CATALOG = {
    "fashion": dict(
        products=["running shoes", "t shirt", "jeans", "kurta", "saree", "sneakers", "jacket", "hoodie",
                  "formal shirt", "track pants", "sandals", "dress", "shorts", "sweater", "leggings",
                  "boots", "polo t shirt", "blazer", "flip flops", "socks", "cap", "handbag", "wallet",
                  "belt", "sunglasses", "watch", "trousers", "skirt", "lehenga", "nightwear"],
        brands=["nike", "adidas", "puma", "levis", "zara", "h&m", "allen solly", "peter england",
                "biba", "woodland", "bata", "fastrack", "titan", "reebok", "skechers", "us polo"],
        attrs={"color": ["red", "black", "white", "blue", "navy", "grey", "green", "pink", "maroon",
                         "beige", "olive", "yellow"],
               "material": ["cotton", "leather", "denim", "linen", "silk", "woolen", "polyester"],
               "style": ["slim fit", "regular fit", "printed", "striped", "casual", "party wear",
                         "oversized", "checked"]},
        tails=["for men", "for women", "for boys", "for girls", "for kids", "size 8", "size 9",
               "size 10", "size xl", "size m", "under 500", "under 1000", "under 2000", "combo"]),
    "electronics": dict(
        products=["smartphone", "smart tv", "laptop", "earbuds", "headphones", "power bank", "charger",
                  "bluetooth speaker", "smartwatch", "tablet", "monitor", "keyboard", "mouse",
                  "usb cable", "hard disk", "pendrive", "router", "printer", "webcam", "gaming laptop",
                  "soundbar", "camera", "memory card", "phone cover"],
        brands=["samsung", "apple", "oneplus", "xiaomi", "realme", "sony", "boat", "jbl", "hp", "dell",
                "lenovo", "asus", "lg", "logitech", "sandisk", "canon", "vivo", "oppo"],
        attrs={"spec": ["5g", "4g", "128gb", "256gb", "8gb ram", "16gb ram", "1tb", "wireless",
                        "fast charging", "noise cancelling", "55 inch", "43 inch", "32 inch", "4k",
                        "type c", "i5", "i7", "rtx 3050", "full hd", "20000mah"],
               "color": ["black", "white", "blue", "silver", "grey"]},
        tails=["under 10000", "under 20000", "under 50000", "with mic", "for gaming", "for students",
               "for office", "with warranty", "combo", "latest model"]),
    "home_kitchen": dict(
        products=["frying pan", "water bottle", "pressure cooker", "bedsheet", "curtains", "mixer grinder",
                  "dinner set", "lunch box", "storage container", "pillow", "mattress", "wall clock",
                  "sofa cover", "door mat", "kettle", "induction cooktop", "knife set", "bath towel",
                  "table lamp", "gas stove", "water purifier", "vacuum cleaner", "iron", "ceiling fan"],
        brands=["prestige", "pigeon", "milton", "cello", "bajaj", "philips", "havells", "borosil",
                "hawkins", "butterfly", "kent", "eureka forbes", "solimo", "wakefit"],
        attrs={"material": ["steel", "stainless steel", "non stick", "glass", "cotton", "plastic",
                            "wooden", "ceramic", "copper"],
               "size": ["1 litre", "2 litre", "3 litre", "5 litre", "750 ml", "double bed", "king size",
                        "single bed", "24 cm", "set of 6", "set of 3", "pack of 2"],
               "color": ["white", "blue", "brown", "grey", "multicolor"]},
        tails=["for kitchen", "for home", "for bedroom", "with lid", "under 500", "under 1000",
               "under 2000", "for gift", "combo"]),
    "beauty": dict(
        products=["face wash", "shampoo", "moisturizer", "sunscreen", "lipstick", "hair oil", "perfume",
                  "face serum", "body lotion", "conditioner", "kajal", "trimmer", "hair dryer", "foundation",
                  "nail polish", "face mask", "deodorant", "beard oil", "soap", "hair straightener"],
        brands=["lakme", "maybelline", "nivea", "loreal", "himalaya", "mamaearth", "the derma co",
                "biotique", "dove", "plum", "wow", "minimalist", "philips", "beardo", "park avenue"],
        attrs={"type": ["oily skin", "dry skin", "sensitive skin", "anti dandruff", "vitamin c",
                        "aloe vera", "matte", "herbal", "spf 50", "onion", "tea tree", "niacinamide"],
               "size": ["100 ml", "200 ml", "50 ml", "400 ml", "pack of 3"]},
        tails=["for men", "for women", "for hair fall", "for glowing skin", "for acne", "under 300",
               "under 500", "combo", "for daily use"]),
    "sports": dict(
        products=["cricket bat", "football", "yoga mat", "dumbbells", "badminton racket", "cycle",
                  "treadmill", "gym gloves", "skipping rope", "tennis ball", "shuttlecock", "protein powder",
                  "resistance band", "basketball", "swimming goggles", "knee support", "sports bottle",
                  "cricket helmet", "carrom board", "chess board"],
        brands=["nivia", "cosco", "yonex", "decathlon", "sg", "ss", "spalding", "boldfit", "strauss",
                "hero", "btwin", "li ning", "muscleblaze", "optimum nutrition"],
        attrs={"spec": ["english willow", "kashmir willow", "size 5", "6 mm", "10 kg", "5 kg",
                        "pair", "adjustable", "anti skid", "gear", "non gear", "26t", "whey", "1 kg"],
               "color": ["black", "blue", "red", "green", "purple"]},
        tails=["for men", "for women", "for kids", "for beginners", "for home gym", "under 1000",
               "under 5000", "combo", "for practice"]),
    "books": dict(
        products=["novel", "story book", "notebook", "diary", "exam guide", "cookbook", "comics",
                  "dictionary", "biography", "self help book", "colouring book", "atlas", "textbook",
                  "poetry book", "question bank", "previous year papers"],
        brands=["penguin", "harper collins", "arihant", "disha", "oxford", "classmate", "rupa",
                "ncert", "mtg", "scholastic"],
        attrs={"lang": ["english", "hindi", "marathi", "tamil", "bengali"],
               "topic": ["upsc", "ssc", "jee", "neet", "class 10", "class 12", "python", "history",
                         "finance", "mystery", "romance", "fantasy", "kids"]},
        tails=["for kids", "for beginners", "2024 edition", "latest edition", "paperback", "hardcover",
               "combo", "set of 5", "under 300"]),
    "grocery": dict(
        products=["basmati rice", "atta", "cooking oil", "green tea", "coffee", "sugar", "toor dal",
                  "ghee", "honey", "dry fruits", "almonds", "biscuits", "chocolate", "instant noodles",
                  "peanut butter", "masala", "salt", "oats", "cornflakes", "juice", "pickle", "tea"],
        brands=["tata", "aashirvaad", "fortune", "saffola", "amul", "nescafe", "bru", "dabur",
                "patanjali", "britannia", "parle", "cadbury", "maggi", "kelloggs", "red label", "everest"],
        attrs={"size": ["1 kg", "5 kg", "500 g", "250 g", "1 litre", "5 litre", "200 g", "pack of 4",
                        "pack of 12"],
               "type": ["organic", "sugar free", "refined", "cold pressed", "roasted", "premium",
                        "whole wheat", "instant"]},
        tails=["combo", "family pack", "value pack", "for weight loss", "for kids", "offer"]),
    "toys": dict(
        products=["remote control car", "building blocks", "soft toy", "doll", "board game", "puzzle",
                  "toy kitchen set", "action figure", "teddy bear", "rc helicopter", "baby rattle",
                  "play tent", "drawing kit", "ride on car", "toy gun", "rubiks cube", "lego set"],
        brands=["lego", "funskool", "hot wheels", "barbie", "mattel", "hasbro", "fisher price",
                "mirana", "webby", "toyshine", "hamleys"],
        attrs={"age": ["for 3 year old", "for 5 year old", "for 1 year old", "for 8 year old",
                       "for toddlers"],
               "spec": ["rechargeable", "educational", "musical", "wooden", "1000 pieces", "pack of 6",
                        "battery operated", "big size"]},
        tails=["for boys", "for girls", "for kids", "gift set", "under 500", "under 1000", "combo"]),
}
# query shapes, each a list of slots: brand, attr (one facet), product, tail; weights below
TEMPLATES = [(["product"], 3), (["brand", "product"], 4), (["attr", "product"], 4),
             (["product", "tail"], 4), (["brand", "attr", "product"], 2), (["attr", "product", "tail"], 3),
             (["brand", "product", "tail"], 2), (["attr", "attr", "product"], 1),
             (["brand", "attr", "product", "tail"], 1), (["product", "attr"], 1)]


def zipf_weights(n, s=1.1):
    return [1 / (r + 1) ** s for r in range(n)]


def generate_queries(n, seed):
    """n (query, category) pairs. A fixed seed gives the same list on every machine."""
    rng = random.Random(seed)
    cats = sorted(CATALOG)
    cat_w = zipf_weights(len(cats), 0.6)
    shapes, shape_w = zip(*TEMPLATES)
    out = []
    for _ in range(n):
        cat = rng.choices(cats, cat_w)[0]
        c = CATALOG[cat]
        facets = sorted(c["attrs"])
        words = []
        for slot in rng.choices(shapes, shape_w)[0]:
            if slot == "product":
                words.append(rng.choices(c["products"], zipf_weights(len(c["products"])))[0])
            elif slot == "brand":
                words.append(rng.choices(c["brands"], zipf_weights(len(c["brands"])))[0])
            elif slot == "attr":
                vals = c["attrs"][rng.choice(facets)]
                words.append(rng.choices(vals, zipf_weights(len(vals), 0.8))[0])
            else:
                words.append(rng.choices(c["tails"], zipf_weights(len(c["tails"]), 0.8))[0])
        out.append((" ".join(words), cat))
    return out


def norm_category(c):
    return " ".join(c.lower().split())


def read_data(path, bad_rows, log):
    """(query, category) pairs from a CSV/TSV/JSONL file with columns text,category."""
    read_records = common.opt_in("records", "--data").read_records  # only a user's file needs it
    rows, bad, reasons = read_records(path, "--data", ("text", "category"), bad_rows=bad_rows)
    if bad:
        log(f"--data {path}: {bad} bad rows skipped (first: {'; '.join(reasons)})")
    pairs = [(" ".join(r["text"].lower().split()), norm_category(r["category"])) for r in rows]
    if len(pairs) < 10:
        raise UserError(f"--data {path}: only {len(pairs)} usable rows; need at least 10 (text and category both "
                        "non-empty)")
    return pairs


# -----------------------------------------------------------------------------
# tokenizer: lowercase whitespace words, capped vocabulary

def build_vocab(pairs, cap):
    counts = {}
    for text, _ in pairs:
        for w in text.split():
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))[:max(0, cap - len(SPECIALS))]
    return SPECIALS + words


def encode(text, stoi):
    return [BOS] + [stoi.get(w, UNK) for w in text.split()[:MAX_WORDS]] + [EOS]


def pack(pairs, stoi, cat_index):
    """Tokenize once into one flat int32 tensor + offsets: far lighter than a list of tensors."""
    seqs = [encode(t, stoi) for t, _ in pairs]
    lens = torch.tensor([len(s) for s in seqs])
    return {"tokens": torch.tensor([w for s in seqs for w in s], dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
            "cats": torch.tensor([cat_index[c] for _, c in pairs])}


def make_batch(data, idx):
    """Right-padded (x, y, cat) for the sequences at idx; y is x shifted by one (next word)."""
    seqs = [data["tokens"][data["offsets"][i]:data["offsets"][i + 1]].long() for i in idx.tolist()]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), PAD)
    y = torch.full((len(seqs), T), PAD)
    for b, s in enumerate(seqs):
        x[b, :len(s) - 1] = s[:-1]
        y[b, :len(s) - 1] = s[1:]
    return {"x": x, "y": y, "cat": data["cats"][idx]}


# -----------------------------------------------------------------------------
# models, their loss and validation

class CadenceGRU(nn.Module):
    """The seed's optimized model: [word emb 128 ; category emb 64] at every step -> GRU 256 ->
    dropout (the seed's 0.3; train_gru.py passes --dropout) -> softmax over the vocabulary. Category
    enters at every step, so it constrains every next word, not just the first."""
    supports_grad_checkpointing = False  # one cuDNN GRU layer: nothing to recompute per layer

    def __init__(self, vocab, n_cats, emb=128, cat_emb=64, hidden=256, dropout=0.3):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        self.cat_emb = nn.Embedding(n_cats, cat_emb)
        self.gru = nn.GRU(emb + cat_emb, hidden, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x, cat, h=None):  # x (B, T), cat (B,) -> logits (B, T, V), h (1, B, H)
        e = self.emb(x)
        c = self.cat_emb(cat)[:, None, :].expand(-1, x.size(1), -1)
        # cuDNN's GRU under autocast runs in fp16 whatever autocast's dtype (ATen's AutocastRNN.cpp
        # casts it to half): under bf16 no GradScaler guards its small gradients. So the recurrence
        # stays fp32, the head still runs in the autocast dtype (on a CPU autocast leaves GRUs alone)
        with torch.autocast(x.device.type, enabled=False):
            out, h = self.gru(torch.cat([e, c], dim=-1).float(), h)
        return self.head(self.drop(out)), h


class GRUMNLayer(nn.Module):
    """GRU with a memory tape (Cheng et al. 2016, as used by CADENCE): instead of h_{t-1}, the
    gates see h~_t, an attention-weighted sum of all earlier hidden states of this sequence:
        a_i = v . tanh(W_h h_i + W_x x_t + W_h~ h~_{t-1}),  h~_t = sum_{i<t} softmax(a)_i h_i
    It is O(T^2) per sequence and steps in Python: the memory cost the seed ran out of."""

    def __init__(self, inp, hidden, attn):
        super().__init__()
        self.cell = nn.GRUCell(inp, hidden)
        self.w_h = nn.Linear(hidden, attn, bias=False)
        self.w_x = nn.Linear(inp, attn)
        self.w_ht = nn.Linear(hidden, attn, bias=False)
        self.v = nn.Linear(attn, 1, bias=False)

    def forward(self, x):  # x (B, T, in) -> (B, T, hidden)
        B, T, _ = x.shape
        wx = self.w_x(x)  # (B, T, A), all steps at once
        h_tilde = x.new_zeros(B, self.cell.hidden_size)
        tape, tape_proj, outs = [], [], []
        for t in range(T):
            if t > 0:  # t = 0: empty tape, h~ = 0 (right padding never reaches earlier steps)
                H, P = torch.stack(tape, 1), torch.stack(tape_proj, 1)  # (B, t, hidden), (B, t, A)
                score = self.v(torch.tanh(P + (wx[:, t] + self.w_ht(h_tilde))[:, None])).squeeze(-1)
                h_tilde = (score.softmax(-1)[..., None] * H).sum(1)
            h = self.cell(x[:, t], h_tilde)
            tape.append(h)
            tape_proj.append(self.w_h(h))
            outs.append(h)
        return torch.stack(outs, 1)


class CadenceGRUMN(nn.Module):
    """The seed's memory-heavy original (the paper's Query LM): 3 GRU-MN layers 2000/1500/1000,
    attention 1000/750/500, embedding 256, the one-hot category fed to every layer
    (layer 1: [e_t ; c], layer l>1: relu(W_c c + h^{l-1})), a context layer tanh(W h + W_c c)
    of 500, dropout 0.8 between layers (the paper's value, likely a TF keep-probability)."""
    supports_grad_checkpointing = True

    def __init__(self, vocab, n_cats, emb=256, hidden=(2000, 1500, 1000), attn=(1000, 750, 500),
                 context=500, dropout=0.8):
        super().__init__()
        self.n_cats = n_cats
        self.emb = nn.Embedding(vocab, emb, padding_idx=PAD)
        ins = [emb + n_cats, *hidden[:-1]]
        self.layers = nn.ModuleList(GRUMNLayer(i, h, a) for i, h, a in zip(ins, hidden, attn))
        self.cat_in = nn.ModuleList(nn.Linear(n_cats, h, bias=False) for h in hidden[:-1])
        self.ctx_h = nn.Linear(hidden[-1], context)
        self.ctx_c = nn.Linear(n_cats, context, bias=False)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(context, vocab)
        self.grad_checkpointing = False

    def forward(self, x, cat, h=None):  # h unused: the tape is rebuilt from the full prefix
        c = F.one_hot(cat, self.n_cats).float()[:, None, :].expand(-1, x.size(1), -1)  # (B, T, C)
        z = torch.cat([self.emb(x), c], dim=-1)
        for i, layer in enumerate(self.layers):
            if i > 0:
                z = torch.relu(self.cat_in[i - 1](c) + self.drop(z))
            # recompute each layer's tape in backward instead of keeping it: the biggest activations
            z = checkpoint(layer, z, use_reentrant=False) if self.grad_checkpointing else layer(z)
        return self.head(self.drop(torch.tanh(self.ctx_h(z) + self.ctx_c(c)))), None


def build_model(preset, vocab, n_cats, dropout=None):
    """dropout None: the preset's own (it only matters in training; --suggest passes none)."""
    kw = {} if dropout is None else {"dropout": dropout}
    return CadenceGRU(vocab, n_cats, **kw) if preset == "optimized" else CadenceGRUMN(vocab, n_cats, **kw)


def loss_fn(model, mb, device):
    """Summed next-word cross-entropy over real tokens, and their count (common.train_step
    normalises by the token count of the whole accumulated batch)."""
    x, y, cat = (mb[k].to(device, non_blocking=True) for k in ("x", "y", "cat"))
    logits, _ = model(x, cat)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")
    return loss, (y != PAD).sum()


@torch.inference_mode()
def evaluate(model, data, device, amp_dtype, bs=256, ranks=common.OneProcess()):
    """Validation loss per token and perplexity; under torchrun each rank sums its share of the
    queries and the sums are added up (ranks.all), so every rank gets the same figures."""
    model.eval()
    total, n = 0.0, 0
    rows = ranks.slice(torch.arange(len(data["cats"])))
    for i in range(0, len(rows), bs):
        batch = make_batch(data, rows[i:i + bs])
        with common.autocast(device, amp_dtype):
            loss, k = loss_fn(model, batch, device)
        total, n = total + loss.item(), n + int(k)
    model.train()
    total, n = ranks.all(total, "sum"), ranks.all(n, "sum")
    return total / n, math.exp(total / n)


def targets(data, idx):
    """How many next-word targets the queries at idx hold (make_batch's y != PAD), counted from
    the offsets alone: each rank knows its global batch's count without asking the others."""
    return int((data["offsets"][idx + 1] - data["offsets"][idx] - 1).sum())


def unigram_ppl(train, val, vocab):
    """Category-blind unigram baseline (add-one smoothed): what a model that ignores context
    and category scores. BOS is never predicted, so it is not counted."""
    counts = torch.bincount(train["tokens"].long(), minlength=vocab).double() + 1
    counts[BOS] = 0
    logp = (counts / counts.sum()).log()
    targets = val["tokens"].long()[val["tokens"] != BOS]
    return math.exp(-logp[targets].mean().item())


# -----------------------------------------------------------------------------
# the run: flags and data checked, the run folder opened, then train()

@dataclass
class Run:
    """One run's context: set up by main() (and the precision and totals by train()) before the
    loop, read by the helpers below, as icefall passes its `params`."""
    args: object  # the resolved flags
    out: Path
    log: object  # log(message): the console and <out>/train.log
    status: dict
    stop: dict  # common.stop_requested(stop, out) says why to stop, if anyone asked
    ranks: object  # common.OneProcess, or ddp.Ranks under torchrun
    device: torch.device
    amp_dtype: object  # torch.bfloat16 / torch.float16 / None (fp32)
    scaler: object
    prec_why: str
    state: dict = None  # the checkpoint resumed from
    resumed_from: Path = None
    eval_bs: int = 256  # halved for good if a validation batch runs out of memory
    tb: object = None  # --tensorboard's SummaryWriter (rank 0), opened by train() before the loop
    # the totals of the run's earlier segments (a run stopped and resumed counts over all of them)
    wall_before: float = 0.0
    train_before: float = 0.0
    samples_before: int = 0

    def totals(self, t_start, samples_seen):
        """(wall_s, train_s, samples) over every segment, this one (training since t_start) included."""
        now = time.time()
        return (self.wall_before + now - self.status["started"], self.train_before + now - t_start,
                self.samples_before + samples_seen)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, sources = common.resolve_settings(parser, argv, own_changes=[
        ("eval batch", 256, "micro-batch", "validation at the training micro-batch"),
        ("optim", "adamw", "adafactor", "factored 2nd moment, no 1st: ~1 % of the state; worse on real text "
                                        "(run-contract.md)")])
    if any(a == "--max-len" or a.startswith("--max-len=") for a in argv):
        print("note: --max-len is the old name of --max-words (words to generate); it still works",
              file=sys.stderr)
    if args.suggest is not None:
        return run_suggest(args)
    if not 0 < args.val_frac < 0.5:
        raise UserError(f"--val-frac {args.val_frac}: must be between 0 and 0.5")
    if args.category is not None:
        raise UserError("--category only applies with --suggest")
    if args.dropout is None:  # original: the paper's 0.8, not re-measured (it does not run in minutes)
        args.dropout, sources["dropout"] = (DROPOUT if args.preset == "optimized" else 0.8), "auto"
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    if args.quick and sources["epochs"] == "default":
        # --quick checks the setup in well under a minute; 8 epochs would take ~3x as long
        args.epochs, sources["epochs"] = QUICK_EPOCHS, "quick"

    # -- data (validated before the run folder is touched)
    common.fetch_data(args, ("data",), print, exts=common.RECORD_EXTS)
    if args.data:
        pairs = read_data(args.data, args.bad_rows, print)
        data_desc = f"{args.data} ({len(pairs)} queries)"
    else:
        n = args.dataset_size or (5000 if args.quick else 10000)
        if args.dataset_size is None:
            args.dataset_size, sources["dataset_size"] = n, "auto"
        if n < 20:
            raise UserError(f"--dataset-size {n}: too few queries to split into train and validation; use 20 or more")
        pairs = generate_queries(n, seed=args.seed)
        data_desc = f"built-in generator ({n} queries)"
    cats = sorted({c for _, c in pairs})
    # split by a seeded shuffle, not file order: real exports are often sorted by category
    order = list(range(len(pairs)))
    random.Random(args.seed).shuffle(order)
    n_val = max(1, int(len(pairs) * args.val_frac))
    val_pairs, train_pairs = [pairs[i] for i in order[:n_val]], [pairs[i] for i in order[n_val:]]
    if args.eval_only:  # the same split as the training command's; nothing below runs (no run folder is claimed)
        return run_eval(args, sources, train_pairs=train_pairs, val_pairs=val_pairs)

    # -- device, checkpoint to resume, vocabulary: every user mistake is caught before the run
    # folder is written to
    ranks = common.process_group(args)
    out, (device, amp_dtype, scaler, prec_why), state, resumed_from, notes = common.open_run(args, sources)
    if state is not None and not (isinstance(state, dict) and "extra" in state):
        # a file without a trainer's record (open_run refuses one that names another trainer)
        raise UserError(f"{resumed_from} is not a train_gru.py checkpoint; use a new --out or --no-resume")
    # vocabulary from the training split (or the checkpoint, so ids never shift on resume)
    itos = state["extra"]["itos"] if state else build_vocab(train_pairs, args.vocab_size)
    if state:
        cats = state["extra"]["cats"]
        if state["extra"]["preset"] != args.preset:
            raise UserError(f"{resumed_from} is a --preset {state['extra']['preset']} run; use that "
                            "preset, a new --out, or --no-resume")
    if any(c not in cats for c in {c for _, c in pairs}):
        raise UserError(f"{resumed_from} was trained on other categories than this data; use a new --out "
                        "or --no-resume")
    common.check_world_size(state, resumed_from, ranks.world)

    log, status, stop = ranks.start(out, args, "gru", "val_ppl", notes, device)
    run = Run(args, out, log, status, stop, ranks, device, amp_dtype, scaler, prec_why, state, resumed_from)
    try:
        with common.recording_failures(out, status) if ranks.is_main else contextlib.nullcontext():
            return train(run, sources, train_pairs=train_pairs, val_pairs=val_pairs, itos=itos, cats=cats,
                         data_desc=data_desc)
    finally:
        if run.tb:
            run.tb.close()  # its last events reach the disk however the run ends: finished, stopped or failed
        ranks.end()


# -----------------------------------------------------------------------------
# training: the optimizer, the checkpoint and validation helpers, then train() with the loop

def build_optimizer(model, args, sources, *, n_train, G, log):
    """AdamW (seed: lr 1e-3, wd 0.01), linear warm-up, then cosine decay; Adafactor under --resource-efficient.
    Returns (optimizer, scheduler, steps_per_epoch, total_steps)."""
    if args.resource_efficient and sources["optim"] != "flag":  # a typed --optim wins
        # Adafactor (Shazeer & Stern 2018) keeps no first moment and the second moment of an (n, m) weight as
        # n + m numbers: 0.02 MB of state where AdamW keeps 4.3 (two moments of the 0.56M weights), the largest
        # part of a step's peak tensors. eps2 = 1 makes its step lr x the normalised gradient, as AdamW's (by
        # default it is scaled by each weight's RMS, ~0.04 here), so --lr means the same; decoupled weight decay
        # as AdamW's. Measured (docs/run-contract.md): --quick val perplexity 7.40 -> 7.23, but on real text
        # (Debian descriptions) 357 -> 501 (best 444; lr 1e-3: 568): there --optim adamw keeps AdamW's figure
        optimizer = torch.optim.Adafactor(model.parameters(), lr=args.lr, eps=(None, 1.0), weight_decay=0.01)
    else:
        optimizer = common.make_optimizer(model.parameters(), args, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(n_train / G)
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    common.resource_efficient_eval(args, sources, steps_per_epoch, log)
    if args.warmup is None:  # the seed's rule: warm-up 0 measured no better on real text (358 vs 354)
        args.warmup, sources["warmup"] = min(100, total_steps // 10), "auto"
    warmup = args.warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / max(1, warmup), 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))))
    return optimizer, scheduler, steps_per_epoch, total_steps


def save(run, *, model, optimizer, scheduler, extra, step, epoch, pos, best, micro_bs, accum, t_start,
         samples_seen, best_now=False):
    """A checkpoint of the run as it stands after `step` (rank 0 only); status.json names it."""
    wall_s, train_s, samples = run.totals(t_start, samples_seen)
    ckpt = common.training_state(model, optimizer, scheduler, run.scaler, step=step, epoch=epoch, pos=pos, best=best,
                                 micro_bs=micro_bs, accum=accum, world_size=run.ranks.world,
                                 args=dict(vars(run.args)), wall_s=wall_s, train_s=train_s, samples=samples,
                                 extra=extra)
    path = common.save_checkpoint(run.out, step, ckpt, run.args.keep, protect=run.resumed_from, best=best_now,
                                  log=run.log)
    common.update_status(run.out, run.status, last_checkpoint=str(path.resolve()))


def validate(run, model, val_data, *, step=None, epoch=None, base_ppl=None):
    """(val loss, perplexity) at run.eval_bs; a batch that runs out of memory halves it for good. With
    `step`, rank 0 records them: metrics.jsonl, the log, status.json."""
    (val_loss, val_ppl), run.eval_bs = common.evaluate_halving(
        lambda bs: evaluate(model, val_data, run.device, run.amp_dtype, bs, ranks=run.ranks), run.eval_bs,
        run.device, run.log)
    if step is not None and run.ranks.is_main:
        common.append_metrics(run.out, {"step": step, "epoch": epoch + 1, "val_loss": round(val_loss, 6),
                                        "val_ppl": round(val_ppl, 4)}, run.tb)
        run.log(f"step {step}: val loss {val_loss:.4f}, perplexity {val_ppl:.2f} (unigram baseline {base_ppl:.2f})")
        common.update_status(run.out, run.status, metric=round(val_ppl, 4))
    return val_loss, val_ppl


def resume(run, model, optimizer, scheduler, *, n_train, G, total_steps):
    """The loop's position (step, epoch, batch of the epoch, best val perplexity): from the checkpoint
    being resumed, with the model, optimizer, scheduler, scaler and RNG as they were (moved to a new
    global batch G when one was typed); else the start."""
    run.wall_before, run.train_before, run.samples_before = common.restore_training_state(
        run.state, model, optimizer, scheduler, run.scaler)
    if not run.state:
        return 0, 0, 0, float("inf")
    step, epoch, pos, best = (run.state[k] for k in ("step", "epoch", "pos", "best"))
    run.log(f"resumed from {run.resumed_from} (step {step}, " + (
        f"epoch {epoch + 1}, {pos} batches into it)" if pos or not epoch else f"end of epoch {epoch})"))
    G0 = run.state["micro_bs"] * run.state["accum"] * run.ranks.world
    if G0 != G:
        per_epoch = (math.ceil(n_train / G0), math.ceil(n_train / G))
        step, pos = common.rebatch(scheduler, step, pos, per_epoch=per_epoch, log=run.log,
                                   total=(run.args.max_steps or run.args.epochs * per_epoch[0], total_steps))
    return step, epoch, pos, best


def report(run, *, model, optimizer, val_data, base_ppl, itos, cats, plan, step, start_step, epoch, best,
           t_start, samples_seen, effective_batch, global_batch):
    """The end of a run: validate once more (every rank its share); rank 0 writes summary.json and
    logs a few suggestions from the trained model as a smoke test."""
    out, device, args = run.out, run.device, run.args
    if step == start_step and (out / "summary.json").exists():
        return common.finished_before(out, run.status if run.ranks.is_main else None, step, run.log)
    _, val_ppl = validate(run, model, val_data)
    if not run.ranks.is_main:
        return 0
    wall_s, train_s, samples = run.totals(t_start, samples_seen)
    n_params, n_trainable = common.count_params(model)
    common.write_json_atomic(out / "summary.json", dict(
        trainer="gru", metric="val_ppl", value=round(val_ppl, 4), best_value=round(best, 4),
        unigram_ppl=round(base_ppl, 4), steps=step, epochs=epoch, samples_per_s=round(samples / max(1e-9, train_s), 1),
        **plan.figures(run.log),
        params=n_params, trainable_params=n_trainable, wall_s=round(wall_s, 1), preset=args.preset,
        device=device.type, precision=args.precision, effective_batch=effective_batch, world_size=run.ranks.world,
        global_batch=global_batch))
    run.log(f"done: val perplexity {val_ppl:.2f} vs unigram baseline {base_ppl:.2f} ({val_ppl / base_ppl:.0%} of "
            f"it); {step} steps in {wall_s:.0f}s; summary {out / 'summary.json'}")
    stoi = {w: i for i, w in enumerate(itos)}
    for prefix, cat in [("red run", "fashion"), ("samsung ", "electronics"), ("steel", "home_kitchen")]:
        if cat in cats:
            sugg = suggest(model, prefix, cat, stoi, itos, cats, beam=3, max_words=args.max_words, device=device)
            run.log(f"suggest {prefix!r} [{cat}]: " + " | ".join(t for _, t in sugg))
    common.update_status(out, run.status, state="finished", step=step, metric=round(val_ppl, 4), eta_s=0)
    return 0


def train(run, sources, *, train_pairs, val_pairs, itos, cats, data_desc):
    """data -> model -> fit the machine -> optimizer -> resume -> the loop -> report."""
    args, out, log, ranks, device = run.args, run.out, run.log, run.ranks, run.device
    cat_index = {c: i for i, c in enumerate(cats)}
    stoi = {w: i for i, w in enumerate(itos)}
    train_data, val_data = pack(train_pairs, stoi, cat_index), pack(val_pairs, stoi, cat_index)
    n_train = len(train_pairs)
    log(f"data: {data_desc}; {n_train} train / {len(val_pairs)} val; vocab {len(itos)} words; "
        f"{len(cats)} categories")

    # -- model
    model = build_model(args.preset, len(itos), len(cats), args.dropout).to(device)
    if args.grad_checkpointing and not model.supports_grad_checkpointing:
        log("gradient checkpointing: not used (the optimized preset is one fused GRU layer)")
    model.grad_checkpointing = args.grad_checkpointing and model.supports_grad_checkpointing
    log(f"model: {args.preset}, {common.count_params(model)[0]:,} parameters")

    # -- fit the machine: the effective batch is fixed, the micro-batch and the precision are fitted to
    # the worst case (copies of the longest query); then the optimizer and the memory plan
    compute_loss = functools.partial(loss_fn, device=device)
    longest = int((train_data["offsets"][1:] - train_data["offsets"][:-1]).argmax())
    worst = lambda bs: make_batch(train_data, torch.full((bs,), longest))  # noqa: E731
    micro_bs, accum, run.amp_dtype, why = common.fit_batch(
        model, compute_loss, worst, args, sources, device=device, amp_dtype=run.amp_dtype, prec_why=run.prec_why,
        state=run.state, log=log, ranks=ranks, unit="queries")
    E, G = micro_bs * accum, micro_bs * accum * ranks.world  # queries per rank per step; the global batch
    if args.resource_efficient:  # 256 queries' logits: ~13 of the 57 MB a --quick run adds (docs/run-contract.md)
        run.eval_bs = min(run.eval_bs, micro_bs)
    if 0 < n_train % G < ranks.world:
        raise UserError(f"--batch-size {E} x {ranks.world} processes: the last batch of each epoch would hold "
                        f"{n_train % G} of {n_train} queries, too few for every process; use another --batch-size")
    optimizer, scheduler, steps_per_epoch, total_steps = build_optimizer(model, args, sources, n_train=n_train,
                                                                         G=G, log=log)
    plan = common.memory_plan(args, model, optimizer, compute_loss, worst(micro_bs), device=device,
                              amp_dtype=run.amp_dtype, world=ranks.world, log=log, worst="the longest query")
    if args.plan:
        return common.plan_only(out, run.status, log)

    # -- resume
    step, epoch, pos, best = resume(run, model, optimizer, scheduler, n_train=n_train, G=G, total_steps=total_steps)
    if ranks.is_main:
        common.truncate_metrics(out, step)  # records a killed run wrote after its last checkpoint
        common.write_args(out, args, sources, {"micro_batch": micro_bs, "grad_accum": accum, "effective_batch": E,
                                               "world_size": ranks.world, "global_batch": G,
                                               "precision": args.precision, "device": device.type, "why": why,
                                               "eval_batch": run.eval_bs})
    train_model, no_sync = ranks.wrap(model)  # `model` stays the one we save
    base_ppl = unigram_ppl(train_data, val_data, len(itos))
    extra = {"itos": itos, "cats": cats, "preset": args.preset}  # what --suggest rebuilds the model from

    # -- the loop
    watch = common.memory_watch(args)
    if ranks.is_main:
        common.update_status(out, run.status, state="running", total_steps=total_steps, step=step)
        run.tb = common.tensorboard(args, out)
    t_start, samples_seen, start_step = time.time(), 0, step
    bar = common.progress_bar(total_steps, step) if ranks.is_main else None
    model.train()
    while step < total_steps and (args.max_steps or epoch < args.epochs):
        # the order of an epoch depends only on (seed, epoch): a resumed run sees the same batches
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        while pos < steps_per_epoch and step < total_steps:
            idx = perm[pos * G:(pos + 1) * G]  # the global batch; this rank trains on its slice
            batch = make_batch(train_data, ranks.slice(idx))
            ranks.seed_step(args.seed, step)
            # targets over the whole global batch: DDP's average of the ranks' gradients is then the
            # gradient of the 1-process loss, though the ranks' queries differ in length
            n_global = targets(train_data, idx)
            with plan.measure(batch["x"].numel()):  # a step with the largest batch yet
                loss, n, micro_bs = common.train_step(
                    train_model, optimizer, run.scaler, batch, compute_loss, micro_bs, clip=args.clip, device=device,
                    amp_dtype=run.amp_dtype, log=log, no_sync=no_sync,
                    norm=n_global / ranks.world if ranks.world > 1 else None)
            micro_bs = int(ranks.all(micro_bs, "min"))  # an OOM halving holds for all
            accum = math.ceil(E / micro_bs)
            scheduler.step()
            step, pos, samples_seen = step + 1, pos + 1, samples_seen + len(idx)
            common.check_memory(watch, device, log)
            log_now = step % args.log_every == 0 or step == total_steps
            if ranks.world > 1 and log_now:
                loss = ranks.all(loss * n, "sum") / n_global
            if ranks.is_main:
                bar.update(1)
            if ranks.is_main and log_now:
                elapsed, lr = time.time() - t_start, scheduler.get_last_lr()[0]
                mem = common.log_step(log, step, total_steps, loss, lr, elapsed=elapsed, steps=step - start_step,
                                      items=samples_seen, unit="queries", device=device, tb=run.tb)
                common.append_metrics(out, {"step": step, "epoch": epoch + 1, "loss": round(loss, 6), "lr": lr})
                common.update_status(out, run.status, step=step, epoch=epoch + 1, loss=round(loss, 5),
                                     samples_per_s=round(samples_seen / max(1e-9, elapsed), 1),
                                     eta_s=round((total_steps - step) * elapsed / (step - start_step)), **mem)
            end_of_epoch = pos == steps_per_epoch
            is_best = False
            if (args.eval_every and step % args.eval_every == 0) or end_of_epoch or step == total_steps:
                _, val_ppl = validate(run, model, val_data, step=step, epoch=epoch, base_ppl=base_ppl)
                is_best, best = val_ppl < best, min(best, val_ppl)
            if end_of_epoch:
                epoch, pos = epoch + 1, 0  # a checkpoint taken now says "start the next epoch"
            saved = step % args.save_every == 0 or end_of_epoch or is_best or step == total_steps
            stop_why = common.stop_requested(run.stop, out)
            stopping = ranks.all(bool(stop_why), "max")  # every rank stops at the same step
            if (saved or stopping) and ranks.is_main:
                save(run, model=model, optimizer=optimizer, scheduler=scheduler, extra=extra, step=step, epoch=epoch,
                     pos=pos, best=best, micro_bs=micro_bs, accum=accum, t_start=t_start,
                     samples_seen=samples_seen, best_now=is_best)
            if saved or stopping:
                ranks.barrier()  # no rank runs ahead of a checkpoint being written
            if stopping:
                log(f"stopped by {stop_why or 'another rank'} at step {step}; re-run the same command to resume")
                if ranks.is_main:
                    common.update_status(out, run.status, state="stopped", step=step)
                    bar.close()
                return 0
            if end_of_epoch:
                break
    if ranks.is_main:
        bar.close()

    # -- report
    return report(run, model=model, optimizer=optimizer, val_data=val_data, base_ppl=base_ppl, itos=itos, cats=cats,
                  plan=plan, step=step, start_step=start_step, epoch=epoch, best=best, t_start=t_start,
                  samples_seen=samples_seen, effective_batch=E, global_batch=G)


# -----------------------------------------------------------------------------
# serving: --suggest, category-constrained diverse beam search (CADENCE's dynamic beam search)

@torch.inference_mode()
def suggest(model, prefix, category, stoi, itos, cats, *, beam, max_words, device):
    """Completions of `prefix` in `category`. Diversity as in CADENCE: the first word generated
    is branched exhaustively (the `beam` most likely distinct first words), then each branch
    runs its own beam of width `beam`; no two suggestions share their first new word.
    A prefix not ending in a space has a partial last word: the first new word must extend it."""
    category = norm_category(category)
    if category not in cats:
        raise UserError(f"--category {category}: unknown; this model knows {', '.join(cats)}")
    words = prefix.lower().split()
    partial = words.pop() if words and not prefix.endswith(" ") else ""
    model.eval()
    cat = torch.tensor([cats.index(category)], device=device)

    def next_logp(seqs):  # seqs: list of id lists -> (N, V) log-probs of the next word
        x = torch.tensor(seqs, device=device)
        logits, _ = model(x, cat.expand(len(seqs)))
        return logits[:, -1].float().log_softmax(-1)

    start = [BOS] + [stoi.get(w, UNK) for w in words]
    logp = next_logp([start])[0]
    allowed = torch.full_like(logp, float("-inf"))
    ok = [i for i, w in enumerate(itos) if i > EOS and w.startswith(partial)]
    if not ok:
        return []
    allowed[ok] = 0  # the first new word is a real word (no PAD/UNK/BOS/EOS) extending `partial`
    groups = [(logp[w].item(), start + [w]) for w in (logp + allowed).topk(min(beam, len(ok))).indices.tolist()]
    for _ in range(3):  # too few branches (e.g. "run" -> "running" -> "shoes"): branch one word later
        growing = [g for g in groups if g[1][-1] != EOS]
        if len(groups) >= beam or not growing:
            break
        lp = next_logp([s for _, s in growing])
        lp[:, [PAD, UNK, BOS]] = float("-inf")
        # CADENCE's rising thresholds: a word opens a branch only with p > 0.05 (the best always does)
        cand = sorted(((sc + v.item(), s + [i.item()], v.item()) for (sc, s), row in zip(growing, lp)
                       for v, i in zip(*row.topk(min(beam, row.numel())))), key=lambda g: -g[0])
        groups = [g for g in groups if g[1][-1] == EOS] + [
            (sc, s) for k, (sc, s, v) in enumerate(cand) if k == 0 or v > math.log(0.05)]
        groups = sorted(groups, key=lambda g: -g[0])[:beam]
    results = []
    for group in groups:  # one independent beam per branch: the diversity constraint
        live, done = ([], [group]) if group[1][-1] == EOS else ([group], [])
        for _ in range(max_words - 1):
            if not live:
                break
            lp = next_logp([s for _, s in live])
            lp[:, [PAD, UNK, BOS]] = float("-inf")
            cand = []
            for (score, seq), row in zip(live, lp):
                top = row.topk(min(beam, row.numel()))
                cand += [(score + v.item(), seq + [i.item()]) for v, i in zip(top.values, top.indices)]
            cand.sort(key=lambda c: -c[0])
            live = []
            for score, seq in cand[:beam]:
                (done if seq[-1] == EOS else live).append((score, seq))
        done += live  # unfinished at max_words still count
        # length-normalised score: otherwise the shortest completion always wins
        score, seq = max(done, key=lambda d: d[0] / (len(d[1]) - len(start)))
        results.append((score / (len(seq) - len(start)),
                        " ".join(words + [itos[i] for i in seq[len(start):] if i != EOS])))
    model.train()
    return sorted(results, key=lambda r: -r[0])


def run_suggest(args):
    out = Path(args.out) if args.out else common.newest_run("gru")
    if out is None:
        raise UserError("--suggest: no run folder given and none found under runs/; pass --out RUN")
    # the model the summary's best_value measured: best.pt, else the newest checkpoint (or --resume PATH)
    state, path = common.load_run_model(out, "--out", "gru", "extra", resume=args.resume)
    extra = state["extra"]
    itos, cats = extra["itos"], extra["cats"]
    model = build_model(extra["preset"], len(itos), len(cats))
    model.load_state_dict(state["model"])
    category = norm_category(args.category) if args.category else cats[0]
    print(f"model {path} (step {state['step']}); category {category}; prefix {args.suggest!r}")
    found = suggest(model, args.suggest, category, {w: i for i, w in enumerate(itos)}, itos, cats,
                    beam=args.beam, max_words=args.max_words, device=torch.device("cpu"))
    for score, text in found:
        print(f"  {text:<50} {score:7.3f}")
    if not found:
        print(f"  no word in the vocabulary starts with {args.suggest.split()[-1]!r}")
    return 0


# -----------------------------------------------------------------------------
# evaluation without training: --eval-only

def run_eval(args, sources, *, train_pairs, val_pairs):
    """--eval-only: the run's best.pt (or --resume CKPT) on this command's validation split, scored as
    training scores it (evaluate() at the same batch, 256 or --resource-efficient's micro-batch, and the
    run's precision), printed as training prints it and written to <out>/eval.json. Nothing else in the
    run folder is written: no checkpoint, status.json, metrics.jsonl, train.log or tb/. The GRU holds out
    only a validation split (no test split), so there are no test figures. The model is built from the
    checkpoint (its preset, vocabulary and categories). The same data split another way (--dataset-size,
    --val-frac, --seed; --quick's size) is refused: its validation split would hold training queries."""
    if args.resume and not args.out:
        raise UserError(f"--eval-only --resume {args.resume}: pass --out RUN too (eval.json is written there)")
    out = Path(args.out) if args.out else common.newest_run("gru")
    if out is None:
        raise UserError("--eval-only: no run folder given and none found under runs/; pass --out RUN")
    state, path = common.load_run_model(out, "--out", "gru", "extra", resume=args.resume)
    extra, saved = state["extra"], state.get("args") or {}
    itos, cats = extra["itos"], extra["cats"]
    unknown = sorted({c for _, c in train_pairs + val_pairs} - set(cats))
    if unknown:
        raise UserError(f"{path} was trained on other categories than this data ({', '.join(unknown[:3])} ...); "
                        "evaluate it with the data flags of its training command")
    differs = [f"--{k.replace('_', '-')} {getattr(args, k)} (trained with {saved[k]})"
               for k in ("data", "dataset_size", "val_frac", "seed") if k in saved and saved[k] != getattr(args, k)]
    if differs and saved.get("data") == args.data:  # the same queries split another way: some it trained on
        raise UserError(f"--eval-only: {', '.join(differs)}: that validation split would hold queries {path} "
                        "trained on; repeat the training command's data flags" + (
                            " (--quick included)" if saved.get("quick") and not args.quick else
                            " (without --quick)" if args.quick and saved.get("quick") is False else ""))
    if differs:
        print(f"note: {', '.join(differs)}: the figures are for this data's validation split", file=sys.stderr)
    device, amp_dtype, _, _ = common.setup_device(args, sources)
    if device.type == "cpu" and sources["precision"] == "auto" and saved.get("device") == "cpu":
        # a CPU run's auto precision was measured (common.measure_precision): score as that run did
        args.precision = saved.get("precision", "fp32")
        amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    model = build_model(extra["preset"], len(itos), len(cats)).to(device)
    model.load_state_dict(state["model"])
    stoi, cat_index = {w: i for i, w in enumerate(itos)}, {c: i for i, c in enumerate(cats)}
    train_data, val_data = pack(train_pairs, stoi, cat_index), pack(val_pairs, stoi, cat_index)
    base_ppl = unigram_ppl(train_data, val_data, len(itos))
    bs = min(Run.eval_bs, saved.get("batch_size", Run.eval_bs)) if saved.get("resource_efficient") else Run.eval_bs
    (val_loss, val_ppl), _ = common.evaluate_halving(  # the training run's batch: the same sums, the same figure
        lambda bs: evaluate(model, val_data, device, amp_dtype, bs), bs, device, print)
    step = state["step"]
    print(f"model {path} (step {step}); {len(val_pairs)} validation queries; device {device.type}, "
          f"precision {args.precision}")
    print(f"step {step}: val loss {val_loss:.4f}, perplexity {val_ppl:.2f} (unigram baseline {base_ppl:.2f})")
    # value and unigram_ppl rounded as summary.json rounds them; val_loss and val_ppl unrounded
    common.write_json_atomic(out / "eval.json", {
        "trainer": "gru", "metric": "val_ppl", "value": round(val_ppl, 4), "checkpoint": str(Path(path).resolve()),
        "step": step, "val_loss": val_loss, "val_ppl": val_ppl, "unigram_ppl": round(base_ppl, 4),
        "val_queries": len(val_pairs), "preset": extra["preset"], "device": device.type, "precision": args.precision})
    print(f"eval: val perplexity {val_ppl:.2f} vs unigram baseline {base_ppl:.2f} ({val_ppl / base_ppl:.0%} of it); "
          f"{out / 'eval.json'}")
    return 0


if __name__ == "__main__":
    common.run_main(main)
