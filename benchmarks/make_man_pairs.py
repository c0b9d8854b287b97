"""make_man_pairs.py -- real English -> shell command pairs from this machine's man pages.

    python benchmarks/make_man_pairs.py --out /tmp/man_pairs.jsonl
    python train_sft.py --data /tmp/man_pairs.jsonl --out runs/man

Nobody here wrote these pairs: they come from the pages the installed packages ship in
/usr/share/man/man1 and man8 (gzipped troff, read directly, no groff). Two kinds are taken:

  name     the NAME line "cmd \\- one-line description" of every page -> (description, cmd).
           A page that names several commands ("bzip2, bunzip2 \\- ...") gives the first one;
           symlinks and ".so" redirect pages are skipped (their target page gives the pair).
  example  in an EXAMPLES section, a prose paragraph directly followed by a command line whose
           first word is the page's own command (after an optional "$ ", "% " or "# " prompt),
           in a no-fill block (.nf/.EX/.RS/.Bd/.Dl/.in) or alone on its line. Lines ending in
           a backslash are joined. The prose, with a leading "To " and a trailing ", run:" /
           "type:" / ":" removed, is the instruction; only the first command after it is taken,
           and only prose of 8-200 characters and one-line commands of at most 200.

Everything else in a page (options tables, SYNOPSIS) is ignored. Deterministic: pages in sorted
order; duplicate instructions keep the shortest command (then the smallest), so "gcloud compute
disks list" wins over its "gcloud alpha ..." twin with the same description. Output: one
{"input", "output": "<command>CMD</command>", "kind", "page"} object a line, the format
train_sft.py --data reads (it ignores the extra fields). Prints the counts.
"""

import argparse
import gzip
import json
import re
from collections import Counter
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--man-dir", default="/usr/share/man", help="root of the man page tree")
parser.add_argument("--sections", default="man1,man8", help="comma-separated section folders to read")
parser.add_argument("--out", default="/tmp/man_pairs.jsonl", help="JSONL file to write")

# troff escapes -> text. Order matters: \e is a backslash, so it is swapped for a marker first.
ESCAPES = [(r"\(aq", "'"), (r"\(cq", "'"), (r"\(oq", "'"), (r"\(dq", '"'), (r"\(lq", '"'), (r"\(rq", '"'),
           (r"\(em", "--"), (r"\(en", "-"), (r"\(mi", "-"), (r"\(hy", "-"), (r"\(bu", "*"), (r"\(ti", "~"),
           (r"\(ha", "^"), (r"\(ga", "`"), (r"\[aq]", "'"), (r"\[dq]", '"'), (r"\[em]", "--"), (r"\[en]", "-"),
           (r"\[bu]", "*"), (r"\[ti]", "~"), (r"\[ha]", "^"), (r"\[lq]", '"'), (r"\[rq]", '"'), (r"\[mi]", "-"),
           (r"\[hy]", "-"), (r"\-", "-"), (r"\ ", " "), (r"\~", " "), (r"\0", " "), (r"\&", ""), (r"\%", ""),
           (r"\c", ""), (r"\:", ""), (r"\/", ""), (r"\,", ""), (r"\^", ""), (r"\|", ""), (r"\.", "."),
           (r"\'", "'"), (r"\`", "`")]
FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\*(\[[^\]]*\]|\(..|.)|\\[nk](\[[^\]]*\]|\(..|.)")
FONT_MACROS = {"B", "I", "R", "SB", "SM", "BR", "BI", "IB", "IR", "RB", "RI", "CW", "CR",
               "Nm", "Ar", "Fl", "Cm", "Pa", "Ic", "Li", "Ql", "Sy", "Em", "Va", "Ev", "Xr", "Dq", "Sq", "Op"}
BREAKS = {"PP", "P", "LP", "IP", "TP", "SS", "Ss", "sp", "br", "HP", "TQ", "Pp", "Lp", "It", "Bl", "El"}
NOFILL_ON, NOFILL_OFF = {"nf", "EX", "Bd", "RS", "in"}, {"fi", "EE", "Ed", "RE"}
PROMPT = re.compile(r"^(?:[$%#]\s+)?(.*)$")
LEAD = re.compile(r"^(?:\*\s*|\d+[.)]\s+|example\s+\d+[.:]?\s+)?(?:to\s+)?", re.I)
VERB = (r"(?:run|use|type|enter|execute|try|issue|invoke|you can run|you can use|you would run|you can type)"
        r"(?: the following(?: command)?)?")
# ", run" / " run:" / ":" / " use" at the end (not "... to use")
TAIL = re.compile(rf"(?:,\s*{VERB}\s*:?|\s+{VERB}\s*:|(?<!\sto)\s+(?:run|use)|\s*:)\s*$", re.I)
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def clean(s):
    """One troff line's text: escapes replaced, font changes and strings dropped, spaces squeezed."""
    s = s.replace(r"\e", "\x00").replace(r"\\", "\x00")
    s = FONT.sub("", s)
    for a, b in ESCAPES:
        s = s.replace(a, b)
    s = re.sub(r"\\.", "", s).replace("\x00", "\\")
    return " ".join(s.split())


def macro_text(line):
    """The text of a font macro line (.B foo, .BR ls (1), mdoc .Nm/.Fl/...): its arguments, quotes off;
    mdoc .Fl gets its dash back."""
    name, _, rest = line[1:].partition(" ")
    args = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', rest)]
    if name == "Fl":
        args = ["-" + a if i == 0 else a for i, a in enumerate(args)]
    sep = "" if name in ("BR", "BI", "IB", "IR", "RB", "RI") else " "
    return clean(sep.join(args))


def sections(text):
    """{section title (upper case): [lines]} of one page (.SH / mdoc .Sh)."""
    out, cur = {}, None
    for line in text.split("\n"):
        m = re.match(r'^\.S[Hh]\s+"?([^"]*)"?\s*$', line)
        if m:
            cur = clean(m.group(1)).upper()
            out.setdefault(cur, [])
        elif cur is not None:
            out[cur].append(line)
    return out


def name_pair(lines):
    """(names, description) from a NAME section, or None."""
    text, nm, nd = [], [], None
    for line in lines:
        if line.startswith(".Nm"):
            nm.append(macro_text(line))
        elif line.startswith(".Nd"):
            nd = clean(line[3:])
        elif line.startswith((".", "'")):
            continue
        else:
            text.append(line)
    if nd is not None and nm:  # mdoc
        names, desc = ", ".join(nm), nd
    else:
        joined = " ".join(text)
        m = re.search(r"\s\\-\s|\s\\\(em\s|\s-\s", joined)
        if not m:
            return None
        names, desc = clean(joined[:m.start()]), clean(joined[m.end():])
    names = [n.strip() for n in names.split(",") if n.strip()]
    desc = desc.strip().rstrip(".")
    if not names or not desc or len(desc) < 3:
        return None
    return names, desc


def blocks(lines):
    """The section as [(kind, text)]: 'prose' (a filled paragraph) or 'code' (one no-fill line);
    continuation lines ending in a backslash are joined into one code line."""
    out, para, nofill = [], [], False

    def flush():
        if para:
            out.append(("prose", " ".join(para)))
            para.clear()

    for line in lines:
        if line.startswith(("'", ".\\\"", '.\\"')) or line.startswith('\\"'):
            continue
        if line.startswith("."):
            name = line[1:].split(" ")[0].strip()
            if name in NOFILL_ON or name == "Dl":
                flush()
                if name == "Dl":  # mdoc's one-line display
                    out.append(("code", macro_text(line)))
                else:
                    nofill = name != "in" or "+" in line
                continue
            if name in NOFILL_OFF or (name == "in" and "+" not in line):
                flush()
                nofill = False
                continue
            if name in BREAKS:
                flush()
                continue
            if name in FONT_MACROS:
                text = macro_text(line)
            else:
                continue
        else:
            text = clean(line)
        if not text:
            if not nofill:
                flush()
            continue
        if nofill:
            flush()
            if out and out[-1][0] == "code" and out[-1][1].endswith("\\"):
                out[-1] = ("code", out[-1][1][:-1].rstrip() + " " + text)
            else:
                out.append(("code", text))
        else:
            para.append(text)
    flush()
    return out


def example_pairs(lines, names):
    """(instruction, command) pairs of an EXAMPLES section: prose directly followed by a line
    that runs one of the page's commands."""
    firsts = {n.split()[0] for n in names}
    pairs, bl = [], blocks(lines)
    for (k1, prose), (k2, code) in zip(bl, bl[1:]):
        # a command: a no-fill line, or a filled paragraph that starts with a prompt
        is_cmd = k2 == "code" or code.startswith(("$ ", "% ", "# "))
        cmd = PROMPT.match(code).group(1).strip() if is_cmd else ""
        if k1 != "prose" or not cmd or cmd.split()[0] not in firsts or cmd.endswith("\\"):
            continue
        last = SENTENCE.split(prose.strip())[-1]  # "Assume X. To do Y, run:" -> "To do Y, run:"
        inst = TAIL.sub("", LEAD.sub("", last)).strip().rstrip(".:,;").strip()
        if 8 <= len(inst) <= 200 and len(inst.split()) >= 3 and len(cmd) <= 200:
            pairs.append((inst[0].lower() + inst[1:] if inst[:2] != inst[:2].upper() else inst, cmd))
    return pairs


def main():
    args = parser.parse_args()
    root = Path(args.man_dir)
    found, kinds, skipped = {}, Counter(), Counter()
    for sec in args.sections.split(","):
        for path in sorted((root / sec).glob("*.gz")):
            if path.is_symlink():
                skipped["symlink"] += 1
                continue
            try:
                text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
            except (OSError, EOFError):
                skipped["unreadable"] += 1
                continue
            if text.lstrip().startswith(".so "):
                skipped[".so redirect"] += 1
                continue
            secs = sections(text)
            np_ = name_pair(secs.get("NAME", []))
            if not np_:
                skipped["no NAME line"] += 1
                continue
            names, desc = np_
            cands = [(desc, names[0], "name")]
            ex = next((v for k, v in secs.items() if k.startswith("EXAMPLE")), [])
            cands += [(i, c, "example") for i, c in example_pairs(ex, names)]
            for inst, cmd, kind in cands:
                kinds[kind + " (raw)"] += 1
                rec = {"input": inst, "output": f"<command>{cmd}</command>", "kind": kind, "page": path.name,
                       "cmd": cmd}
                old = found.get(inst)
                if old is None or (len(cmd), cmd) < (len(old["cmd"]), old["cmd"]):
                    found[inst] = rec
    out = sorted(found.values(), key=lambda r: (r["page"], r["kind"] != "name", r["input"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in out:
            f.write(json.dumps({k: r[k] for k in ("input", "output", "kind", "page")}) + "\n")
    by = Counter(r["kind"] for r in out)
    gc = Counter((r["kind"], r["page"].startswith("gcloud")) for r in out)
    cmds = Counter(r["cmd"] for r in out)
    print(f"pages skipped: {dict(skipped)}")
    print(f"raw pairs: {dict(kinds)}")
    print(f"written {len(out)} pairs to {args.out} (distinct instructions): {by['name']} name, "
          f"{by['example']} example; gcloud pages {gc['name', True]} name + {gc['example', True]} example, "
          f"other pages {gc['name', False]} name + {gc['example', False]} example")
    print(f"distinct commands {len(cmds)}; commands that answer 2+ instructions: "
          f"{sum(1 for c in cmds.values() if c > 1)} ({sum(c for c in cmds.values() if c > 1)} pairs)")
    lens = sorted(len(r["cmd"]) for r in out)
    print(f"command length (chars) median {lens[len(lens) // 2]}, 90th pct {lens[len(lens) * 9 // 10]}, "
          f"over 62 (beyond train_sft.py's 64-token answer budget): {sum(n > 62 for n in lens)}")


if __name__ == "__main__":
    main()
