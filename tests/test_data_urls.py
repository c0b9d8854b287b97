"""Every trainer's data flag takes an http(s) URL (common.fetch_data): the real scripts train on
files served by a local http.server, keep the download in --download-dir, and check --sha256.
The fetch itself (resume, size limit, redirects) is tested in test_fetch.py."""
import functools
import hashlib
import http.server
import json
import threading

import pytest

from conftest import read_json, run


@pytest.fixture
def www(tmp_path):
    """(folder served, base URL): files written into the folder are served at once."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def served(p, flag, url):
    """The download is logged, kept in data/downloads, and the run trained."""
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"{flag} {url}: saved data/downloads/" in p.stdout, p.stdout[-3000:]


def test_lm_data_url_is_fetched_packed_and_trained(www, tmp_path):
    from pydoc_data.topics import topics
    root, base = www
    text = "\n\n".join(topics[k] for k in sorted(topics)[:60])
    (root / "book.txt").write_text(text, encoding="utf-8")
    url = base + "/book.txt"
    flags = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
             "--grad-accum", "1", "--eval-tokens", "256", "--max-steps", "2", "--data", url]
    p = run("train_lm.py", *flags, "--out", "lm", cwd=tmp_path)
    served(p, "--data", url)
    assert f"--data {url}: packed into data/downloads/" in p.stdout
    meta = json.loads(next((tmp_path / "data" / "downloads").glob("*.packed/meta.json")).read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(text.encode())
    # the same command again: the file and its packing are reused, nothing is fetched twice
    p = run("train_lm.py", *flags, "--out", "lm2", cwd=tmp_path, check=0)
    assert "downloaded before" in p.stdout and "packed into" not in p.stdout
    bad = run("train_lm.py", *flags, "--sha256", "0" * 64, "--out", "lm3", cwd=tmp_path, check=2)
    assert "does not match --sha256" in bad.stdout + bad.stderr or "SHA-256 mismatch" in bad.stderr


def test_sft_data_url(www, tmp_path):
    import train_sft
    root, base = www
    pairs = train_sft.builtin_pairs()[::30]
    body = "".join(json.dumps(p) + "\n" for p in pairs).encode()
    (root / "pairs.jsonl").write_bytes(body)
    url = base + "/pairs.jsonl"
    p = run("train_sft.py", "--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "160",
            "--data", url, "--sha256", hashlib.sha256(body).hexdigest(), "--max-steps", "1", "--out", "s", cwd=tmp_path)
    served(p, "--data", url)
    assert read_json(tmp_path / "s" / "summary.json")["test_pairs"] == sum(train_sft.split_of(q) == 0 for q in pairs)


def test_gru_data_url(www, tmp_path):
    import train_gru
    root, base = www
    rows = train_gru.generate_queries(300, seed=0)
    (root / "queries.csv").write_text("text,category\n" + "".join(f"{t},{c}\n" for t, c in rows) + "only text,\n")
    url = base + "/queries.csv"
    p = run("train_gru.py", "--quick", "--data", url, "--batch-size", "8", "--max-steps", "2", "--out", "g",
            cwd=tmp_path)
    served(p, "--data", url)
    assert "1 bad rows skipped (first: line 302: empty 'category')" in p.stdout
    p = run("train_gru.py", "--quick", "--data", url, "--bad-rows", "fail", "--out", "g2", cwd=tmp_path, check=2)
    assert "line 302: empty 'category' (--bad-rows skip drops such rows)" in p.stderr


def test_classifier_data_urls(www, tmp_path):
    import train_classifier
    root, base = www
    train, val, test = train_classifier.generate_items(200, 0)
    for name, rows in (("train", train), ("test", test)):
        (root / f"{name}.csv").write_text("text,label\n" + "".join(f'"{t}",{l}\n' for t, l in rows))
    p = run("train_classifier.py", "--quick", "--data", base + "/train.csv", "--test-data", base + "/test.csv",
            "--max-steps", "2", "--out", "c", cwd=tmp_path)
    served(p, "--data", base + "/train.csv")
    served(p, "--test-data", base + "/test.csv")
    assert sum(map(sum, read_json(tmp_path / "c" / "summary.json")["confusion_matrix"])) == len(test)


def test_asr_manifest_url_fetches_its_audio(www, tmp_path):
    from test_asr import tone, write_pcm
    root, base = www
    (root / "wav").mkdir()
    rows = []
    for i in range(12):
        write_pcm(root / "wav" / f"u{i}.wav", tone(300 + 40 * i, 16000, seconds=0.6), 16000, 2)
        rows.append(json.dumps({"audio_filepath": f"wav/u{i}.wav", "text": "ab" if i % 2 else "ba"}))
    (root / "m.jsonl").write_text("\n".join(rows) + "\n")
    url = base + "/m.jsonl"
    p = run("train_asr.py", "--train-manifest", url, "--val-frac", "0.2", "--preset", "tiny", "--max-steps", "1",
            "--beam", "1", "--out", "a", cwd=tmp_path)
    served(p, "--train-manifest", url)
    assert len(list((tmp_path / "data" / "downloads").glob("*-u*.wav"))) == 12
