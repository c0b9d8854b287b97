"""download.fetch / common.fetch_data (every trainer's data flags take an http(s) URL: resume, size limit,
checksum, redirects, errors) against a local HTTP server in a thread, and records.read_records
through train_sft.py's .jsonl/.csv pair reader. In-process: no trainer runs here."""
import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest

import common
import download
from records import MAX_REASONS
import train_sft
from common import UserError

DATA = bytes(range(256)) * 400  # 102,400 bytes: several 64 KiB reads
DATA_SHA = hashlib.sha256(DATA).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files, honouring `Range: bytes=N-` unless server.ignore_range; can be told to
    cut the first response after server.cut_after bytes, to answer 404 for unknown paths, and to
    stream without Content-Length (HTTP/1.0: the body ends when the connection closes)."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path in srv.redirects:
            self.send_response(302)
            self.send_header("Location", srv.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        if self.path in srv.types:
            self.send_header("Content-Type", srv.types[self.path])
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if not srv.no_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if srv.cut_after is not None:
            k, srv.cut_after = srv.cut_after, None  # the first request only
            self.wfile.write(body[start:start + k])
            self.wfile.flush()
            if srv.stall:  # keep the connection open and silent: the client's socket timeout fires
                srv.release.wait(10)
            else:
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees EOF before Content-Length
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.redirects, srv.types = {"/d/data.jsonl": DATA}, [], {}, {}
    srv.cut_after, srv.ignore_range, srv.no_length, srv.stall = None, False, False, False
    srv.release = threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def leftovers(d):
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_full_download_then_reuse(server, tmp_path, capsys):
    url = server.url + "/d/data.jsonl"
    logs = []
    p = download.fetch(url, tmp_path / "dl", sha256=DATA_SHA, log=logs.append)
    assert p.read_bytes() == DATA and p.name.endswith("-data.jsonl")
    assert leftovers(tmp_path / "dl") == [p.name]  # no .part
    assert "100%" in capsys.readouterr().err  # the tqdm bar ran to the end
    assert server.requests == [("/d/data.jsonl", None)]
    # a second call reuses the finished file without touching the network
    assert download.fetch(url, tmp_path / "dl", sha256=DATA_SHA, log=logs.append) == p
    assert len(server.requests) == 1 and "downloaded before" in logs[-1]


def test_same_basename_from_two_urls_does_not_collide(server, tmp_path):
    server.files["/e/data.jsonl"] = b"other"
    a = download.fetch(server.url + "/d/data.jsonl", tmp_path, log=lambda m: None)
    b = download.fetch(server.url + "/e/data.jsonl", tmp_path, log=lambda m: None)
    assert a != b and a.read_bytes() == DATA and b.read_bytes() == b"other"


def test_interrupted_download_resumes_with_range(server, tmp_path):
    url, d, k = server.url + "/d/data.jsonl", tmp_path / "dl", 70_000
    server.cut_after = k
    with pytest.raises(UserError, match=f"interrupted after {k:,} of {len(DATA):,} bytes; re-run the same command to resume"):
        download.fetch(url, d, sha256=DATA_SHA, log=lambda m: None)
    (part,) = d.iterdir()
    assert part.name.endswith(".part") and part.stat().st_size == k
    p = download.fetch(url, d, sha256=DATA_SHA, log=lambda m: None)
    assert server.requests[-1] == ("/d/data.jsonl", f"bytes={k}-")
    assert p.read_bytes() == DATA and hashlib.sha256(p.read_bytes()).hexdigest() == DATA_SHA
    assert leftovers(d) == [p.name]


def test_stalled_server_times_out_and_resumes(server, tmp_path):
    url, d = server.url + "/d/data.jsonl", tmp_path / "dl"
    server.cut_after, server.stall = 10_000, True
    with pytest.raises(UserError, match="interrupted after 10,000 bytes .*timed out.*; re-run the same command"):
        download.fetch(url, d, log=lambda m: None, timeout=0.3)
    assert download.fetch(url, d, log=lambda m: None).read_bytes() == DATA
    assert server.requests[-1][1] == "bytes=10000-"


def test_complete_part_and_416_is_verified(server, tmp_path):
    # killed after the last byte but before the rename: the server answers 416 to the resume
    d = tmp_path / "dl"
    d.mkdir()
    url = server.url + "/d/data.jsonl"
    (d / (download.download_name(url) + ".part")).write_bytes(DATA)
    p = download.fetch(url, d, log=lambda m: None)
    assert server.requests == [("/d/data.jsonl", f"bytes={len(DATA)}-")]
    assert p.read_bytes() == DATA and leftovers(d) == [p.name]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    url, d = server.url + "/d/data.jsonl", tmp_path / "dl"
    server.cut_after, server.ignore_range = 30_000, True
    with pytest.raises(UserError, match="resume"):
        download.fetch(url, d, log=lambda m: None)
    logs = []
    p = download.fetch(url, d, sha256=DATA_SHA, log=logs.append)
    assert server.requests[-1][1] == "bytes=30000-"  # asked, and got a 200 with the whole file
    assert p.read_bytes() == DATA  # not the first 30,000 bytes twice
    assert any("ignored the resume request" in m for m in logs)


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    d = tmp_path / "dl"
    with pytest.raises(UserError, match=f"expected {'ab' * 32}, got {DATA_SHA}"):
        download.fetch(server.url + "/d/data.jsonl", d, sha256="AB" * 32, log=lambda m: None)
    assert leftovers(d) == []
    # a mistyped --sha256 after a verified download: the file an earlier run used stays (a new user's review)
    p = download.fetch(server.url + "/d/data.jsonl", d, sha256=DATA_SHA, log=lambda m: None)
    with pytest.raises(UserError, match=f"the download was deleted, {re.escape(str(p))} \\(downloaded before\\) kept"):
        download.fetch(server.url + "/d/data.jsonl", d, sha256="AB" * 32, log=lambda m: None)
    assert p.read_bytes() == DATA and leftovers(d) == [p.name]


def test_http_and_connection_errors(server, tmp_path):
    with pytest.raises(UserError, match=r"/nope\.jsonl: HTTP 404"):
        download.fetch(server.url + "/nope.jsonl", tmp_path, log=lambda m: None)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    with pytest.raises(UserError, match="cannot connect"):
        download.fetch(f"http://127.0.0.1:{port}/a.jsonl", tmp_path, log=lambda m: None)


def test_schemes_and_local_paths(tmp_path):
    for url in ("ftp://example.com/a.csv", "file:///etc/passwd"):
        with pytest.raises(UserError, match="only http\\(s\\) URLs or local paths"):
            download.fetch(url, tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        download.fetch(str(tmp_path / "missing.csv"), tmp_path)
    f = tmp_path / "a.csv"
    f.write_text("x")
    assert download.fetch(str(f), tmp_path / "dl") == f and download.fetch(str(tmp_path), tmp_path / "dl") == tmp_path
    assert not (tmp_path / "dl").exists()  # a local path is used where it is, never copied


@pytest.mark.parametrize("no_length", [False, True])
def test_size_limit(server, tmp_path, no_length):
    server.no_length = no_length  # without Content-Length the limit is enforced while streaming
    d = tmp_path / "dl"
    with pytest.raises(UserError, match="--max-download-mb"):
        download.fetch(server.url + "/d/data.jsonl", d, max_bytes=len(DATA) - 1, log=lambda m: None)
    assert leftovers(d) == []
    p = download.fetch(server.url + "/d/data.jsonl", d, max_bytes=len(DATA), log=lambda m: None)
    assert p.read_bytes() == DATA


# -----------------------------------------------------------------------------
# pair files

CSV = ('\ufeffDescription,Command,Explanation\n'
       'list files,ls -la,"shows all, even hidden"\n'
       '\n'
       'count lines,wc -l file,\n'
       'empty command,,nothing\n'
       'too many,a,b,c\n'
       '"find text, case-insensitive",grep -i foo,\n')


def test_read_pairs_csv(tmp_path):
    f = tmp_path / "cmds.csv"
    f.write_text(CSV, encoding="utf-8")
    records, bad, reasons = train_sft.read_pairs(f, "--download-data")
    assert records == [
        {"input": "list files", "output": "<command>ls -la</command> shows all, even hidden"},
        {"input": "count lines", "output": "<command>wc -l file</command>"},
        {"input": "find text, case-insensitive", "output": "<command>grep -i foo</command>"}]
    assert bad == 2 and reasons == ["line 5: empty 'command'",
                                    "line 6: 4 fields, expected 3 (quote texts that contain the delimiter)"]
    # the explanation column may be absent altogether
    f.write_text("description,command\nsay hi,echo hi\n")
    assert train_sft.read_pairs(f, "--download-data")[0] == [{"input": "say hi", "output": "<command>echo hi</command>"}]
    f.write_text("question,answer\na,b\n")
    with pytest.raises(UserError, match=r"--download-data .*cmds\.csv: missing column\(s\) description, command"):
        train_sft.read_pairs(f, "--download-data")


JSONL = ('{"input": "a", "output": "b", "source": "ignored"}\n'
         '\n'
         '{"input": "c", "output": \n'
         '["not", "an", "object"]\n'
         '{"input": "d"}\n'
         '{"input": "e", "output": 5}\n'
         '{"input": "  ", "output": "f"}\n'
         '  {"input": " g ", "output": "h"}  \n')


def test_read_pairs_jsonl_and_folder(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(JSONL)
    records, bad, reasons = train_sft.read_pairs(f, "--download-data")
    assert records == [{"input": "a", "output": "b"}, {"input": "g", "output": "h"}]
    assert bad == 5
    assert reasons[0].startswith("line 3: not JSON") and reasons[1:] == [
        "line 4: not a JSON object (list)", "line 5: no 'output'", "line 6: 'output' is not text (int)",
        "line 7: empty 'input'"]
    (tmp_path / "cmds.csv").write_text(CSV)
    (tmp_path / "notes.txt").write_text("not data")  # other files in a folder are not read
    records, bad, reasons = train_sft.read_pairs(tmp_path, "--download-data")
    assert len(records) == 3 + 2 and records[0]["input"] == "list files"  # sorted: cmds.csv first
    assert bad == 2 + 5 and len(reasons) == MAX_REASONS and reasons[0] == "cmds.csv line 5: empty 'command'"


def test_read_pairs_unreadable_files(tmp_path):
    for name, data, msg in [("a.txt", b"x", "unknown file type '.txt'"),
                            ("b.jsonl", b'{"input": "\xff"}', "not UTF-8"),
                            ("c.csv", b"", "the file is empty")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f"--download-data .*{name}: {msg}"):
            train_sft.read_pairs(tmp_path / name, "--download-data")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no .jsonl or .csv files"):
        train_sft.read_pairs(empty, "--download-data")


# -----------------------------------------------------------------------------
# the flags and fetch_pairs

def parse(*argv):
    return train_sft.parser.parse_args(list(argv))


def test_more_sha256_than_sources_is_a_one_line_exit_2(capsys):
    args = parse("--download-data", "https://example.com/a.jsonl", "--sha256", "a" * 64, "--sha256", "b" * 64)
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: common.fetch_data(args, ("data", "download_data")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: --sha256 given 2 times for 1 data sources (--data / --download-data)")
    for argv, msg in [(["--download-data", "https://example.com/a.jsonl", "--sha256", "xyz"], "not a SHA-256"),
                      (["--download-data", "https://example.com/data?fmt=csv"], "must end in .jsonl or .csv")]:
        with pytest.raises(UserError, match=msg):
            common.fetch_data(parse(*argv), ("data", "download_data"), exts=train_sft.PAIR_EXTS)


def test_fetch_data_mixes_urls_and_local_paths(server, tmp_path):
    server.files["/p.jsonl"] = JSONL.encode()
    (tmp_path / "cmds.csv").write_text(CSV)
    args = parse("--download-data", server.url + "/p.jsonl", "--download-data", str(tmp_path / "cmds.csv"),
                 "--sha256", hashlib.sha256(JSONL.encode()).hexdigest(), "--download-dir", str(tmp_path / "dl"))
    common.fetch_data(args, ("data", "download_data"), log=lambda m: None)
    assert args.download_data == [str(tmp_path / "dl" / download.download_name(server.url + "/p.jsonl")),
                                  str(tmp_path / "cmds.csv")]
    # a local file is checked against its --sha256 too
    args = parse("--download-data", str(tmp_path / "cmds.csv"), "--sha256", "0" * 64)
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        common.fetch_data(args, ("data", "download_data"))
    # a source with no usable pair at all is an error, not an empty fine-tune
    (tmp_path / "bad.jsonl").write_text("nope\n")
    with pytest.raises(UserError, match="no usable input/output pairs, 1 bad rows"):
        train_sft.sft_pairs(parse("--download-data", str(tmp_path / "bad.jsonl")), log=lambda m: None)


def test_redirects_only_to_http(server, tmp_path):
    """urllib alone would follow a redirect to ftp:; a data URL may only lead to http(s)."""
    server.redirects = {"/r.jsonl": server.url + "/d/data.jsonl", "/bad.jsonl": "ftp://example.com/x.jsonl"}
    assert download.fetch(server.url + "/r.jsonl", tmp_path, log=lambda m: None).read_bytes() == DATA
    with pytest.raises(UserError, match="redirected to ftp://example.com/x.jsonl; only http"):
        download.fetch(server.url + "/bad.jsonl", tmp_path, flag="--test-data", log=lambda m: None)


def test_other_torchrun_ranks_wait_for_local_rank_0s_file(server, tmp_path, monkeypatch):
    server.files["/p.jsonl"] = JSONL.encode()
    args = parse("--download-data", server.url + "/p.jsonl", "--download-dir", str(tmp_path / "dl"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = threading.Thread(target=lambda: common.fetch_data(args, ("data", "download_data"), log=lambda m: None),
                             daemon=True)
    rank1.start()
    rank1.join(1.5)
    assert rank1.is_alive() and server.requests == []  # waiting, not downloading
    monkeypatch.setenv("LOCAL_RANK", "0")
    download.fetch(server.url + "/p.jsonl", tmp_path / "dl", log=lambda m: None)  # local rank 0's part
    rank1.join(5)
    assert not rank1.is_alive() and Path(args.download_data[0]).read_bytes() == JSONL.encode()
    assert len(server.requests) == 1  # one transfer for both ranks


def test_an_html_page_is_not_data(server, tmp_path):
    # a login or error page sent with status 200 is refused, and nothing is kept to be reused
    server.files["/d/gone.csv"] = b"<!DOCTYPE html><html><body>Please sign in</body></html>"
    server.types["/d/gone.csv"] = "text/html; charset=utf-8"
    with pytest.raises(UserError, match="HTML page, not a data file"):
        download.fetch(server.url + "/d/gone.csv", tmp_path / "dl")
    assert leftovers(tmp_path / "dl") == []
    # one saved by an older version is not reused either: it is fetched again
    server.files["/d/gone.csv"], server.types = b"text,label\nmilk,food\n", {}
    name = download.download_name(server.url + "/d/gone.csv")
    (tmp_path / "dl" / name).write_bytes(b"  <html><body>Not found</body></html>")
    logs = []
    p = download.fetch(server.url + "/d/gone.csv", tmp_path / "dl", log=logs.append)
    assert p.read_bytes() == b"text,label\nmilk,food\n" and "is an HTML page" in logs[0]
    # a URL that names an .html file gets its HTML
    server.files["/d/page.html"] = b"<html>words</html>"
    server.types["/d/page.html"] = "text/html"
    assert download.fetch(server.url + "/d/page.html", tmp_path / "dl").read_bytes() == b"<html>words</html>"
