"""train_classifier.py's Hugging Face loader, encoder and WordPiece tokenizer against the real
`transformers`: tests/data/golden.json holds what transformers computed on the same tiny
checkpoints (tests/data/make_golden.py, run once by hand in its own venv; transformers is not
needed here). CPU, no network, a few seconds."""
import json
import sys
from pathlib import Path

import pytest
import torch

import train_classifier as tcl
from common import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
import tiny_checkpoints as tc  # noqa: E402

GOLDEN = json.loads((Path(__file__).resolve().parent / "data" / "golden.json").read_text(encoding="utf-8"))
HEAD = ("pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias")


def load(tmp_path, kind, fmt):
    w = tc.write_checkpoint(tmp_path / f"{kind}-{fmt}", kind, fmt)
    model, tok, shape, desc, missing, unexpected = tcl.load_pretrained(tmp_path / f"{kind}-{fmt}", tc.N_LABELS)
    return w, model.eval(), tok, missing, unexpected


def max_err(hidden, golden_rows):
    """Largest |ours - transformers| over the golden (row, position) vectors."""
    return max((hidden[r, int(p)] - torch.tensor(v)).abs().max().item()
               for r, row in enumerate(golden_rows) for p, v in row.items())


# -----------------------------------------------------------------------------
# the encoder matches transformers' BertModel / DistilBertForSequenceClassification

@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_pretrained_matches_transformers(tmp_path, kind, fmt):
    w, model, tok, missing, unexpected = load(tmp_path, kind, fmt)
    assert missing == []
    prefix = "bert." if (kind, fmt) == ("bert", "bin") else ""
    if kind == "bert":  # BertModel's pooler has no place in our encoder
        assert sorted(unexpected) == [prefix + "pooler.dense.bias", prefix + "pooler.dense.weight"]
    else:  # load_pretrained always starts a fresh head, so the checkpoint's head is "unexpected"
        assert sorted(unexpected) == sorted(HEAD)

    texts = GOLDEN["model_texts"]
    assert [tok.tokens(t) for t in texts] == GOLDEN["model_tokens"]
    ids, mask = tok.encode(texts, GOLDEN["max_len"])
    assert ids.tolist() == GOLDEN["input_ids"]
    assert mask.long().tolist() == GOLDEN["attention_mask"]  # the last row is padded
    with torch.no_grad():
        hidden = model.encode(ids, mask)  # (B, T, D)
    assert max_err(hidden, GOLDEN[kind]["last_hidden_state"]) < 1e-5

    if kind == "distilbert":  # same head as DistilBertForSequenceClassification, once it has its weights
        model.load_state_dict({k: w[k] for k in HEAD}, strict=False)
        with torch.no_grad():
            logits = model(ids, mask)  # (B, labels)
        assert (logits - torch.tensor(GOLDEN["distilbert"]["logits"])).abs().max().item() < 1e-5


def test_bert_safetensors_and_bin_load_the_same_weights(tmp_path):
    _, a, *_ = load(tmp_path, "bert", "safetensors")
    _, b, *_ = load(tmp_path, "bert", "bin")
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        if not na.startswith(("pre_classifier.", "classifier.")):  # a fresh random head in each
            assert torch.equal(ta, tb), na


def test_missing_tensor_is_reported(tmp_path):
    d = tmp_path / "ckpt"
    w = tc.write_checkpoint(d, "bert", "safetensors")
    del w["encoder.layer.1.output.dense.bias"]
    tc.write_safetensors(d / "model.safetensors", w)
    missing = tcl.load_pretrained(d, 3)[4]
    assert missing == ["transformer.layer.1.ffn.lin2.bias"]


# -----------------------------------------------------------------------------
# safetensors reader and the loader's errors

def test_read_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    tensors = {"f32": x, "f16": x.half(), "bf16": x.bfloat16(), "f64": x.double(),
               "i64": torch.arange(-3, 4), "u8": torch.arange(7, dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "big": torch.randn(40, 33, generator=g)}
    tc.write_safetensors(tmp_path / "t.safetensors", tensors)
    back = tcl.read_safetensors(tmp_path / "t.safetensors")
    assert list(back) == list(tensors)  # __metadata__ is skipped
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name  # bit-exact, half precisions included


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_config_shape_mismatch_names_the_tensor(tmp_path, kind):
    d = tmp_path / "ckpt"
    w = tc.write_checkpoint(d, kind, "safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size" if kind == "bert" else "dim"] = 48  # still divisible by the 4 heads
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError) as e:
        tcl.load_pretrained(d, 3)
    assert any(f"{name} has shape" in str(e.value) for name in w), str(e.value)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wrong_shaped_tensor_names_the_tensor(tmp_path, fmt):
    d = tmp_path / "ckpt"
    w = tc.write_checkpoint(d, "distilbert", fmt)
    bad = "distilbert.transformer.layer.1.ffn.lin1.weight"
    w[bad] = torch.zeros(65, 32)
    if fmt == "safetensors":
        tc.write_safetensors(d / "model.safetensors", w)
    else:
        torch.save(w, d / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"ffn\.lin1\.weight has shape \(65, 32\).*\(64, 32\)") as e:
        tcl.load_pretrained(d, 3)
    assert bad in str(e.value)


@pytest.mark.parametrize("remove", ["folder", "config.json", "vocab.txt", "model.safetensors"])
def test_incomplete_folder_is_a_user_error(tmp_path, remove):
    d = tmp_path / "ckpt"
    tc.write_checkpoint(d, "bert", "safetensors")
    if remove == "folder":
        d = tmp_path / "nowhere"
    else:
        (d / remove).unlink()
    with pytest.raises(UserError, match=remove if remove != "folder" else "config.json"):
        tcl.load_pretrained(d, 3)


# files that are there but broken: one error line naming the file and the fix, never a traceback
BROKEN = {  # name: (file, what to write into it, the file named in the error, words of the fix)
    "vocab-latin1": ("vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\ncaf\xe9\n".encode("latin-1"), "vocab.txt", "UTF-8"),
    "tokenizer-config-not-json": ("tokenizer_config.json", b'{"do_lower_case": tru', "tokenizer_config.json",
                                  "delete it"),
    "tokenizer-config-a-list": ("tokenizer_config.json", b"[true]", "tokenizer_config.json", "delete it"),
    "config-a-list": ("config.json", b"[]", "config.json", "download it again"),
    "bin-a-list": ("pytorch_model.bin", [torch.zeros(2)], "pytorch_model.bin", "state_dict"),
    "bin-nested": ("pytorch_model.bin", {"model": {"w": torch.zeros(2)}}, "pytorch_model.bin", "state_dict"),
    "safetensors-header-a-list": ("model.safetensors", len(b"[]").to_bytes(8, "little") + b"[]",
                                  "model.safetensors", "download it again"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_file_in_the_folder_is_one_error_line(tmp_path, case):
    from conftest import call
    name, content, named, fix = BROKEN[case]
    d = tmp_path / "ckpt"
    tc.write_checkpoint(d, "bert", "bin" if name.endswith(".bin") else "safetensors")
    if isinstance(content, bytes):
        (d / name).write_bytes(content)
    else:
        torch.save(content, d / name)
    p = call("train_classifier.py", "--pretrained", d, "--max-steps", "1", "--out", tmp_path / "run", cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --pretrained"), p.stderr
    assert named in lines[0] and fix in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# WordPiece: our Tokenizer(itos).tokens(s) against transformers' BertTokenizer.tokenize(s)

STRINGS = GOLDEN["tokenize"]["strings"]
# Where we are known to differ from transformers (strict: once fixed, these fail as XPASS;
# then delete the entry).
KNOWN_DIFFERENT = {}  # strings where we knowingly differ from transformers (none now)


def cases():
    for vocab in ("tiny", "rich"):
        for i, s in enumerate(STRINGS):
            reason = KNOWN_DIFFERENT.get(s) or KNOWN_DIFFERENT.get((vocab, s))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(vocab, i, id=f"{vocab}-{i:02d}", marks=marks)


@pytest.mark.parametrize("vocab,i", list(cases()))
def test_wordpiece_matches_transformers(vocab, i):
    itos = tc.TINY_VOCAB if vocab == "tiny" else tc.RICH_VOCAB
    assert tcl.Tokenizer(itos).tokens(STRINGS[i]) == GOLDEN["tokenize"][vocab][i], repr(STRINGS[i])


def test_golden_transformers_tokenizers_agree():
    """transformers 5's Rust-backed BertTokenizer and its Python BertTokenizerLegacy agree on
    every string, so golden.json does not depend on which of the two one calls the reference."""
    for vocab in ("tiny", "rich"):
        assert GOLDEN["tokenize"][vocab] == GOLDEN["tokenize"][vocab + "_legacy"]
