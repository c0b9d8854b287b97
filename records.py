"""records.py -- reading the data files a user gives (--data, --train-manifest, ...): CSV, TSV
or JSON lines, one record per row. Imported only when a trainer reads such a file; the built-in
demo data of a plain run never loads it.

How it works: the extension picks the reader (.csv, .tsv, .jsonl; .json is read as JSON lines
too, as NeMo names its manifests). A header line (CSV/TSV) or the keys of each object (JSONL)
name the columns; `aliases` maps other names to a column. A bad row (not an object, a wrong
number of fields, a missing or empty column) stops the run with its line number under
--bad-rows fail, or is skipped and counted under --bad-rows skip, the first few reasons kept
for the log. A file that cannot be read at all is one `error:` line naming the flag.
"""
import csv
import json
from pathlib import Path

from common import RECORD_EXTS, UserError

MAX_REASONS = 5  # bad-row reasons kept per file; the count covers the rest


def read_records(path, flag, columns, optional=(), aliases=None, bad_rows="fail"):
    """The records of one CSV, TSV or JSONL file (by extension; UTF-8, Excel's BOM allowed).

    Returns (records, bad, reasons): records are dicts of `columns` (non-empty strings, stripped)
    and of whichever `optional` columns the row has; `aliases` maps other header names to a
    column (a manifest's "path" for "audio_filepath"). A row that is not a JSON object, has the
    wrong number of fields, or lacks a column or leaves it empty is bad. With bad_rows "fail"
    (the --bad-rows flag) the first one stops the run with its line number; with "skip" it is
    dropped and counted, and `reasons` keeps the first few ("line 7: empty 'text'"). A file
    that cannot be read at all is a UserError naming the flag.
    """
    p, aliases = Path(path), aliases or {}
    ext = p.suffix.lower()
    if not p.is_file():
        raise UserError(f"{flag} {p}: " + ("a folder; give a .csv, .tsv or .jsonl file" if p.is_dir() else
                                           "file not found; check the path (relative paths start in this folder)"))
    if ext not in RECORD_EXTS:
        raise UserError(f"{flag} {p}: unknown file type '{ext or p.name}'; use .csv, .tsv or .jsonl "
                        f"(columns {','.join(columns)})")
    records, reasons, bad = [], [], 0

    def bad_row(line, why):
        nonlocal bad
        if bad_rows == "fail":
            raise UserError(f"{flag} {p}: line {line}: {why} (--bad-rows skip drops such rows)")
        bad += 1
        if len(reasons) < MAX_REASONS:
            reasons.append(f"line {line}: {why}")

    def take(line, row):
        row = {aliases.get(k, k): v for k, v in row.items()}
        for c in columns:
            if c not in row or row[c] is None:
                return bad_row(line, f"no '{c}'")
            if not isinstance(row[c], str):
                return bad_row(line, f"'{c}' is not text ({type(row[c]).__name__})")
            if not row[c].strip():
                return bad_row(line, f"empty '{c}'")
        records.append({c: row[c].strip() if isinstance(row[c], str) else row[c]
                        for c in (*columns, *optional) if c in row})

    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            if ext in (".jsonl", ".json"):
                for i, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        bad_row(i, f"not JSON ({e.msg})")
                        continue
                    if isinstance(obj, dict):
                        take(i, obj)
                    else:
                        bad_row(i, f"not a JSON object ({type(obj).__name__})")
            else:
                reader = csv.reader(f, delimiter="\t" if ext == ".tsv" else ",")
                header = [c.strip().lower() for c in next(reader, [])]
                if not header:
                    raise UserError(f"{flag} {p}: the file is empty; it needs a header line '{','.join(columns)}' "
                                    "and rows")
                found = {aliases.get(c, c) for c in header}
                missing = [c for c in columns if c not in found]
                if missing:
                    raise UserError(f"{flag} {p}: missing column(s) {', '.join(missing)}; the header line must "
                                    f"name {','.join(columns)} (found: {','.join(header)})")
                for row in reader:
                    if len(row) <= 1 and not "".join(row).strip():
                        continue  # a blank line (",," is a row of empty fields: bad)
                    # a short row may leave out trailing optional columns (an empty explanation)
                    if len(row) > len(header) or any(aliases.get(c, c) in columns for c in header[len(row):]):
                        bad_row(reader.line_num, f"{len(row)} fields, expected {len(header)} (quote texts that "
                                                 "contain the delimiter)")
                    else:
                        take(reader.line_num, dict(zip(header, row)))
    except UnicodeDecodeError:
        raise UserError(f"{flag} {p}: not UTF-8 text; save it as UTF-8")
    except csv.Error as e:
        raise UserError(f"{flag} {p}: malformed {ext[1:].upper()} ({e})")
    except OSError as e:
        raise UserError(f"{flag} {p}: cannot read it ({e.strerror or e})")
    return records, bad, reasons
