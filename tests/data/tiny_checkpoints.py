"""Tiny deterministic BERT / DistilBERT checkpoints in Hugging Face's on-disk layout, written
without transformers (only torch), so tests/test_pretrained.py and tests/data/make_golden.py
build byte-for-byte the same folders: config.json, vocab.txt, tokenizer_config.json and
model.safetensors or pytorch_model.bin.

Weights come from torch.Generator seeds over a fixed, sorted list of (name, shape): the same
seed gives the same tensors on every machine and torch 2.x version (CPU randn). They are
random, not trained; what matters is that both implementations read the same numbers.
"""
import json
import struct
from pathlib import Path

import torch

# [PAD]=0 as in bert-base-uncased; a few words, ##pieces, digits and punctuation, two CJK chars.
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "!", "$", "'", "*", ",", ".", "-",
    "0", "1", "2", "5", "##0", "##2", "##5",
    "the", "a", "to", "and", "for", "hello", "world",
    "uber", "trip", "cafe", "creme", "coffee", "pizza", "rent", "bill", "electric", "store",
    "don", "t", "naive", "un", "##aff", "##able", "walk", "##ing", "##ed", "##s", "##ly",
    "play", "book", "tokyo", "tower", "new", "e", "##e", "x", "##x", "東", "京",
    "grocery", "school",
]

# A richer vocabulary for the WordPiece comparison: every letter and digit alone and as ##x,
# so unknown words come out as pieces instead of a whole-word [UNK].
RICH_VOCAB = TINY_VOCAB + [c for c in "bcdfghijklmnopqrsuvwyz346789"] + \
    ["##" + c for c in "abcdfghijklmnopqrtuvwyz1346789"] + \
    ["cr", "##eme", "caf", "na", "##ive", "quiz", "##zical", "ok", "case", "mixed", "with",
     "tab", "here", "line", "end", "null", "zero", "width", "istanbul", "strasse", "stra", "##ß",
     "ß", "€", "£", "(", ")", "#", "@", "&", "/", ":", ";", "?", "[", "]", "_", "~", "%", "+",
     "\"", "東京", "タ", "##ワ", "##ー", "ﬁ", "##ﬁ"]

N_LABELS = 3  # DistilBERT checkpoint's classification head, as DistilBertForSequenceClassification


def bert_config(vocab_size):
    """config.json of a BertModel (the keys transformers writes). Called by write_checkpoint."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "classifier_dropout": None,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02,
            "intermediate_size": 64, "layer_norm_eps": 1e-12, "max_position_embeddings": 64,
            "model_type": "bert", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 0,
            "position_embedding_type": "absolute", "type_vocab_size": 2, "use_cache": True,
            "vocab_size": vocab_size}


def distilbert_config(vocab_size):
    """config.json of a DistilBertForSequenceClassification with N_LABELS labels."""
    labels = {i: f"LABEL_{i}" for i in range(N_LABELS)}
    return {"activation": "gelu", "architectures": ["DistilBertForSequenceClassification"],
            "attention_dropout": 0.1, "dim": 32, "dropout": 0.1, "hidden_dim": 64,
            "id2label": {str(i): n for i, n in labels.items()}, "label2id": {n: i for i, n in labels.items()},
            "initializer_range": 0.02, "max_position_embeddings": 64, "model_type": "distilbert",
            "n_heads": 4, "n_layers": 2, "pad_token_id": 0, "qa_dropout": 0.1, "seq_classif_dropout": 0.2,
            "sinusoidal_pos_embds": False, "tie_weights_": True, "vocab_size": vocab_size}


def bert_shapes(cfg):
    """(name, shape) of BertModel's parameters, without the `bert.` prefix, pooler included."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    out = [("embeddings.word_embeddings.weight", (cfg["vocab_size"], h)),
           ("embeddings.position_embeddings.weight", (cfg["max_position_embeddings"], h)),
           ("embeddings.token_type_embeddings.weight", (cfg["type_vocab_size"], h)),
           ("embeddings.LayerNorm.weight", (h,)), ("embeddings.LayerNorm.bias", (h,)),
           ("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        for lin in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            out += [(p + lin + ".weight", (h, h)), (p + lin + ".bias", (h,))]
        out += [(p + "intermediate.dense.weight", (i, h)), (p + "intermediate.dense.bias", (i,)),
                (p + "output.dense.weight", (h, i)), (p + "output.dense.bias", (h,))]
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            out += [(p + ln + ".weight", (h,)), (p + ln + ".bias", (h,))]
    return sorted(out)


def distilbert_shapes(cfg):
    """(name, shape) of DistilBertForSequenceClassification, `distilbert.` prefix and head included."""
    d, f = cfg["dim"], cfg["hidden_dim"]
    out = [("distilbert.embeddings.word_embeddings.weight", (cfg["vocab_size"], d)),
           ("distilbert.embeddings.position_embeddings.weight", (cfg["max_position_embeddings"], d)),
           ("distilbert.embeddings.LayerNorm.weight", (d,)), ("distilbert.embeddings.LayerNorm.bias", (d,)),
           ("pre_classifier.weight", (d, d)), ("pre_classifier.bias", (d,)),
           ("classifier.weight", (N_LABELS, d)), ("classifier.bias", (N_LABELS,))]
    for l in range(cfg["n_layers"]):
        p = f"distilbert.transformer.layer.{l}."
        for lin in ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"):
            out += [(p + lin + ".weight", (d, d)), (p + lin + ".bias", (d,))]
        out += [(p + "ffn.lin1.weight", (f, d)), (p + "ffn.lin1.bias", (f,)),
                (p + "ffn.lin2.weight", (d, f)), (p + "ffn.lin2.bias", (d,))]
        for ln in ("sa_layer_norm", "output_layer_norm"):
            out += [(p + ln + ".weight", (d,)), (p + ln + ".bias", (d,))]
    return sorted(out)


def make_weights(shapes, seed):
    """{name: float32 tensor}: N(0, 0.2^2) everywhere, LayerNorm weights 1 + N(0, 0.1^2). One
    generator walks the sorted names, so the values depend only on the seed and the list."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes:
        t = torch.randn(shape, generator=g)
        out[name] = 1 + 0.1 * t if "LayerNorm.weight" in name or "layer_norm.weight" in name else 0.2 * t
    return out


SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                     torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path, tensors, metadata=None):
    """The safetensors layout: 8-byte little-endian header length, JSON header {name: {dtype,
    shape, data_offsets}} (offsets relative to the end of the header), raw little-endian bytes.
    The header is space-padded to a multiple of 8 bytes, as the safetensors library does."""
    header, blobs, pos = {"__metadata__": metadata or {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def checkpoint_tensors(kind, fmt):
    """(config, vocab, {HF name: tensor}) of the tiny `kind` checkpoint as written in format `fmt`.
    BERT: model.safetensors without a prefix (as BertModel saves), pytorch_model.bin with the
    `bert.` prefix (as BertForSequenceClassification saves); the pooler is in both. DistilBERT:
    `distilbert.` prefix and the pre_classifier/classifier head, in both formats."""
    if kind == "bert":
        cfg = bert_config(len(TINY_VOCAB))
        w = make_weights(bert_shapes(cfg), seed=1234)
        if fmt == "bin":
            w = {"bert." + k: v for k, v in w.items()}
    elif kind == "distilbert":
        cfg = distilbert_config(len(TINY_VOCAB))
        w = make_weights(distilbert_shapes(cfg), seed=5678)
    else:
        raise ValueError(kind)
    return cfg, TINY_VOCAB, w


def write_checkpoint(folder, kind, fmt):
    """Write the tiny `kind` ("bert" or "distilbert") checkpoint into `folder` with its weights
    as model.safetensors (fmt "safetensors") or pytorch_model.bin (fmt "bin", torch.save of the
    state dict). Returns {HF name: tensor} as written."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    cfg, vocab, w = checkpoint_tensors(kind, fmt)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    if fmt == "safetensors":
        write_safetensors(d / "model.safetensors", w)
    elif fmt == "bin":
        torch.save(w, d / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return w
