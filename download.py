"""download.py -- data flags given as http(s) URLs, and --sha256 checks of data files.

Imported only when a data flag is a URL or --sha256 is given (common.fetch_data); a plain run
never loads it.

How it works: the bytes go to <name>.part and are renamed to <name> only when complete (and
matching --sha256 when given), so a file under its final name is always whole. An interrupted
transfer keeps the .part, and the next run resumes it with an HTTP Range request; a server that
ignores the range (200 instead of 206) restarts it from byte 0. Redirects are followed only to
http(s). An HTML page where data was expected (a login wall, a "moved" page sent with status 200)
is refused, never saved as data. Under torchrun, local rank 0 downloads and the other ranks wait
for its finished file. Every failure is one `error:` line naming the flag (common.UserError).
"""
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from common import UserError, file_sha256, is_url

FETCH_TIMEOUT_S = 30  # per socket operation: a stalled server fails instead of hanging the run


class RedirectRefused(Exception):
    """A redirect to a scheme other than http(s) (file:, ftp:): never followed."""


class HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp: too; a data URL may only lead to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_url(newurl):
            raise RedirectRefused(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download_name(url):
    """`<8 hex of the URL's SHA-256>-<sanitised basename>`: two URLs ending in the same file name
    (every mirror's data.jsonl) never share a file. The extension survives: the reader needs it."""
    base = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base[-100:]}"

def looks_like_html(path):
    """True when a file starts like an HTML page (what a server sends for a missing file or a
    login wall)."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def fetch(url, dest_dir, flag="--data", *, sha256=None, max_bytes=200 * 2 ** 20, log=print, timeout=FETCH_TIMEOUT_S,
          show_bar=True):
    """Fetch an http(s) URL into dest_dir and return the file's Path; a local file or folder
    path is returned as it is (see the module's docstring for how)."""
    from tqdm import tqdm

    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        # one letter is a Windows drive (C:\data), not a scheme
        if len(scheme) > 1:
            raise UserError(f"{flag} {url}: only http(s) URLs or local paths")
        if not Path(url).exists():
            raise UserError(f"{flag} {url}: no such file or folder (and not an http(s) URL)")
        return Path(url)

    dest_dir = Path(dest_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:
        # torchrun: local rank 0 downloads on each machine; the other ranks wait for its finished
        # file and then reuse it (were rank 0 to fail, torchrun stops them)
        while not (dest_dir / download_name(url)).exists() or \
                (dest_dir / (download_name(url) + ".part")).exists():
            time.sleep(0.5)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--download-dir {dest_dir}: cannot create it ({e.strerror or e})")
    final = dest_dir / download_name(url)
    part = final.with_name(final.name + ".part")
    limit_msg = f"larger than --max-download-mb {max_bytes / 2 ** 20:g}; raise the limit if the file is right"

    def check_sum(path):
        got = file_sha256(path)
        return sha256 is None or got == sha256.lower(), got

    wants_html = final.suffix.lower() in (".html", ".htm")
    if final.exists() and not wants_html and looks_like_html(final):
        log(f"{flag} {url}: {final} is an HTML page, not data (an error or login page saved earlier); "
            "downloading again")
        final.unlink()
    if final.exists():
        ok, got = check_sum(final)
        if ok:
            log(f"{flag} {url}: using {final} (downloaded before)")
            return final
        # kept until a download matches: a mistyped --sha256 must not cost the file an earlier run used
        log(f"{flag} {url}: {final} does not match --sha256 (got {got}); downloading again")

    def finish():
        ok, got = check_sum(part)
        if not ok:
            part.unlink()  # nothing half-right is left to be resumed or reused
            raise UserError(f"{flag} {url}: SHA-256 mismatch: expected {sha256.lower()}, got {got}; the download "
                            "was deleted" + (f", {final} (downloaded before) kept" if final.exists() else "")
                            + " (check the URL and --sha256)")
        with open(part, "rb+") as f:  # on disk before the rename makes it look finished
            os.fsync(f.fileno())
        os.replace(part, final)
        log(f"{flag} {url}: saved {final} ({final.stat().st_size:,} bytes, sha256 {got[:16]}...)")
        return final

    for _ in range(2):  # a second pass only after a resume the server could not honour (416)
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "lean-train"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = urllib.request.build_opener(HttpRedirectsOnly).open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:
                # nothing past our offset: the .part may already be whole. Trust it only if it can
                # be checked: the checksum, else the size the server states ("bytes */SIZE")
                size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
                if sha256 is not None or (size.isdigit() and int(size) == offset):
                    log(f"{flag} {url}: {part} is already complete")
                    return finish()
                log(f"{flag} {url}: the server refused to resume at byte {offset:,}; starting over")
                part.unlink()
                continue
            raise UserError(f"{flag} {url}: HTTP {e.code} {e.reason}")
        except RedirectRefused as e:
            raise UserError(f"{flag} {url}: redirected to {e}; only http(s) redirects are followed")
        except urllib.error.URLError as e:
            raise UserError(f"{flag} {url}: cannot connect ({e.reason})")
        except (OSError, http.client.HTTPException) as e:  # dropped before any header arrived
            raise UserError(f"{flag} {url}: download interrupted after {offset:,} bytes "
                            f"({type(e).__name__}: {e}); re-run the same command to resume")
        with resp:
            if offset and resp.status != 206:
                log(f"{flag} {url}: the server ignored the resume request; starting over")
                offset = 0  # a 200 is the whole file: append it to the .part and it is corrupt
            if not wants_html and resp.headers.get_content_type() == "text/html":
                # a login, error or "file moved" page with status 200: saved, it would be reused
                # as data on every re-run
                part.unlink(missing_ok=True)
                raise UserError(f"{flag} {url}: the server sent an HTML page, not a data file; check the "
                                "URL in a browser (it may need a login, or a direct download link)")
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                part.unlink(missing_ok=True)
                raise UserError(f"{flag} {url}: {total:,} bytes, {limit_msg}")
            done = offset
            bar = tqdm(total=total, initial=offset, desc=final.name[:30], unit="B", unit_scale=True,
                       disable=not show_bar,
                       unit_divisor=1024, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
            try:
                with open(part, "ab" if offset else "wb") as f:
                    while True:
                        # read1: what has arrived, up to 64 KiB; read() would wait to fill its buffer
                        # and lose those bytes to a timeout instead of keeping them in the .part
                        block = resp.read1(1 << 16)
                        if not block:
                            break
                        if done + len(block) > max_bytes:
                            f.close()
                            part.unlink()
                            raise UserError(f"{flag} {url}: more than {max_bytes:,} bytes, {limit_msg}")
                        f.write(block)
                        done += len(block)
                        bar.update(len(block))
                    f.flush()
            except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                raise UserError(f"{flag} {url}: download interrupted after {done:,} bytes "
                                f"({type(e).__name__}: {e}); re-run the same command to resume")
            finally:
                bar.close()
        if total is not None and done < total:  # the server closed early without an error
            raise UserError(f"{flag} {url}: download interrupted after {done:,} of {total:,} bytes; "
                            "re-run the same command to resume")
        return finish()
    raise UserError(f"{flag} {url}: the server refused to resume twice; delete {part} and retry")


def fetch_data(args, flags, log=print, exts=None):
    """The trainer's data flags (dests in `flags`, in order; a list value such as --download-data
    counts each entry) with every http(s) URL fetched into --download-dir and replaced by the
    local file's path. Each --sha256 belongs to the data source in the same position, local
    files included; sources after the last --sha256 are not checked. With `exts`, a URL must end
    in one of them: the file type decides the reader, so that is known before any download."""
    sources = [(dest, i, v) for dest in flags
               for i, v in enumerate(getattr(args, dest) if isinstance(getattr(args, dest), list)
                                     else [getattr(args, dest)]) if v]
    sums = args.sha256 or []
    names = " / ".join("--" + d.replace("_", "-") for d in flags)
    if len(sums) > len(sources):
        raise UserError(f"--sha256 given {len(sums)} times for {len(sources)} data sources ({names}); each --sha256 "
                        "belongs to the data source in the same position")
    for s in sums:
        if len(s) != 64 or any(c not in "0123456789abcdefABCDEF" for c in s):
            raise UserError(f"--sha256 {s}: not a SHA-256 (64 hex digits)")
    for dest, _, v in sources:
        if exts and is_url(v) and Path(download_name(v)).suffix.lower() not in exts:
            raise UserError(f"--{dest.replace('_', '-')} {v}: the URL must end in {' or '.join(exts)} (the file "
                            "type decides how it is read)")
    for k, (dest, i, v) in enumerate(sources):
        flag, sha = "--" + dest.replace("_", "-"), sums[k] if k < len(sums) else None
        if sha is None and not is_url(v):
            continue  # a local path without a checksum: the trainer's own reader checks it
        path = fetch(v, args.download_dir, flag, sha256=sha, max_bytes=int(args.max_download_mb * 2 ** 20), log=log)
        if sha is not None and not is_url(v):  # a local path: fetch had nothing to check
            if not path.is_file():
                raise UserError(f"--sha256 {sha}: {flag} {v} is a folder; a checksum needs one file")
            if file_sha256(path) != sha.lower():
                raise UserError(f"{flag} {v}: SHA-256 mismatch: expected {sha.lower()}, got {file_sha256(path)}")
        if isinstance(getattr(args, dest), list):
            getattr(args, dest)[i] = str(path)
        else:
            setattr(args, dest, str(path))
