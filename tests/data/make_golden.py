"""Write tests/data/golden.json: what the real Hugging Face `transformers` computes on the tiny
checkpoints of tiny_checkpoints.py, as an independent reference for train_classifier.py's
from-scratch BERT/DistilBERT loader, encoder and WordPiece tokenizer (tests/test_pretrained.py).

Run once, by hand, in a separate virtual environment (transformers is not a dependency of
this repository and the tests never import it):

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install -q torch==2.13.0 transformers
    /tmp/hfvenv/bin/python tests/data/make_golden.py

Re-run it only when the tiny checkpoints or the strings below change, and commit golden.json.
"""
import json
import sys
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from transformers import BertModel, BertTokenizer, DistilBertForSequenceClassification

import tiny_checkpoints as tc

try:  # transformers 5: BertTokenizer is the `tokenizers` (Rust) one, the Python one is "Legacy"
    from transformers.models.bert import BertTokenizerLegacy
except ImportError:
    BertTokenizerLegacy = None

HERE = Path(__file__).resolve().parent
MAX_LEN = 12  # model inputs are padded to this length; the last row is short, so it is padded
MODEL_TEXTS = ["Uber trip to the cafe", "unaffable walking!", "Café Crème coffee $12.50", "hello"]
TRICKY = [
    "Café Crème",
    "UBER*TRIP $12.50!!",
    "xylophone quizzically",              # unknown words
    "a" * 101 + " ok",                    # over 100 chars: the whole word is [UNK]
    "b" * 100,                            # exactly 100 chars: still split into pieces
    "MiXeD CaSe WaLkInG",
    "東京 tower 東京タワー",               # CJK ideographs split apart, katakana not
    "tab\there\nnewline\r\nend",
    "null\x00zero\u200bwidth\ufffdend\x07bell",
    "naïve",
    "don't",
    "unaffable walked",
    "12,50€ for £3 (rent)",
    "İstanbul straße ﬁle",
    "non\u00a0breaking\u2003space",
    "line\u2028separator\x85next",
    "pizza 🍕 emoji",
    "hello [MASK] world [UNK]",
    "  leading and trailing  ",
    "",
    "e-mail@x.com #42 ~tilde_under",
    "private\ue000use",
]


def r6(t):
    return [round(float(x), 6) for x in t]


def hidden_rows(hidden, mask):
    """[CLS] and the last word piece (the token before [SEP]) of every row: {position: vector}."""
    out = []
    for h, m in zip(hidden, mask):
        n = int(m.sum())
        out.append({str(p): r6(h[p]) for p in (0, n - 2)})
    return out


out_attn = set()  # attention kernels transformers picked, recorded in golden.json


def load(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], f"{folder}: transformers initialised {info['missing_keys']} at random"
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    out_attn.add(model.config._attn_implementation)
    return model.eval()


def main():
    torch.manual_seed(0)
    out = {"made_by": {"command": "/tmp/hfvenv/bin/python tests/data/make_golden.py",
                       "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                       "torch": torch.__version__,
                       "tokenizer": f"{BertTokenizer.__module__}.{BertTokenizer.__name__}",
                       "note": "Hugging Face outputs on tests/data/tiny_checkpoints.py's checkpoints"},
           "max_len": MAX_LEN, "model_texts": MODEL_TEXTS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in ("bert", "distilbert"):
            for fmt in ("safetensors", "bin"):
                tc.write_checkpoint(tmp / f"{kind}-{fmt}", kind, fmt)
        tok = BertTokenizer.from_pretrained(tmp / "bert-safetensors")
        assert tok.do_lower_case
        enc = tok(MODEL_TEXTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        out["input_ids"], out["attention_mask"] = ids.tolist(), mask.tolist()
        out["model_tokens"] = [tok.tokenize(t) for t in MODEL_TEXTS]

        with torch.no_grad():
            bert = {fmt: load(BertModel, tmp / f"bert-{fmt}")(input_ids=ids, attention_mask=mask).last_hidden_state
                    for fmt in ("safetensors", "bin")}
            assert torch.equal(bert["safetensors"], bert["bin"]), "the two BERT formats should load the same"
            out["bert"] = {"class": "BertModel", "last_hidden_state": hidden_rows(bert["safetensors"], mask)}

            dist = {}
            for fmt in ("safetensors", "bin"):
                m = load(DistilBertForSequenceClassification, tmp / f"distilbert-{fmt}")
                hidden = m.distilbert(input_ids=ids, attention_mask=mask).last_hidden_state
                dist[fmt] = (hidden, m(input_ids=ids, attention_mask=mask).logits)
            assert all(torch.equal(a, b) for a, b in zip(dist["safetensors"], dist["bin"]))
            out["distilbert"] = {"class": "DistilBertForSequenceClassification",
                                 "last_hidden_state": hidden_rows(dist["safetensors"][0], mask),
                                 "logits": [r6(row) for row in dist["safetensors"][1]]}

        vocabs = {"tiny": tc.TINY_VOCAB, "rich": tc.RICH_VOCAB}
        out["tokenize"] = {"strings": TRICKY}
        for name, vocab in vocabs.items():
            (tmp / name).mkdir()
            (tmp / name / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
            fast = BertTokenizer(vocab=str(tmp / name / "vocab.txt"), do_lower_case=True)
            assert len(fast.get_vocab()) == len(vocab), "BertTokenizer did not read the vocab file"
            out["tokenize"][name] = [fast.tokenize(s) for s in TRICKY]
            if BertTokenizerLegacy is not None:
                legacy = BertTokenizerLegacy(str(tmp / name / "vocab.txt"), do_lower_case=True)
                out["tokenize"][name + "_legacy"] = [legacy.tokenize(s) for s in TRICKY]

    out["made_by"]["attn_implementation"] = sorted(out_attn)
    path = HERE / "golden.json"
    path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
