"""Every trainer command in README.md and docs/*.md still parses as written: each `python
train_*.py ...` / `python memory_optimizer.py ...` line in a code block goes through the real
script's argument parser (its subcommand's, for prepare/sample/ask/rate), so a renamed or
removed flag fails here. In-process, nothing is trained; the spelling lines that quote an old
command on purpose ("formerly ...", "it used to be ...") are prose, not code blocks."""
import argparse
import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_gru.py", "train_classifier.py", "train_asr.py", "train_lm.py", "train_sft.py",
           "memory_optimizer.py")


def documented_commands():
    """(file:line, script, argv) for every command line in the fenced code blocks."""
    out = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        block, cont = False, ""
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), start=1):
            if line.lstrip().startswith("```"):
                block = not block
                continue
            if not block:
                continue
            line = cont + line.split("  #")[0].split(" # ")[0].rstrip()
            if line.endswith("\\"):
                cont = line[:-1] + " "
                continue
            cont = ""
            if not re.search(r"python3? (\S*/)?(" + "|".join(map(re.escape, SCRIPTS)) + ")", line):
                continue  # output in a transcript, or another program
            try:
                words_all = shlex.split(line.strip().removeprefix("$ "), comments=True)
            except ValueError as e:  # an unclosed quote: a broken command line
                raise AssertionError(f"{doc.name}:{n}: {e}: {line}")
            parts, cur = [], []
            for w in words_all:  # split at shell operators, which shlex keeps as words
                if w in ("&&", "||", ";", "|"):
                    parts, cur = parts + [cur], []
                else:
                    cur.append(w)
            for words in parts + [cur]:
                for i, w in enumerate(words[:3]):
                    if w in SCRIPTS and (i == 0 or words[i - 1].endswith("python") or words[i - 1] == "python3"):
                        out.append((f"{doc.name}:{n}", w, words[i + 1:]))
    return out


COMMANDS = documented_commands()


def parser_for(script, argv):
    """The parser that reads argv, and argv without its subcommand."""
    mod = importlib.import_module(script[:-3])
    if script == "memory_optimizer.py":
        return mod.build_parser(), argv
    subs = {"train_lm.py": {"prepare": "prepare_parser", "sample": "sample_parser"},
            "train_sft.py": {"ask": "ask_parser", "rate": "rate_parser"}}.get(script, {})
    if argv[:1] and argv[0] in subs:
        return getattr(mod, subs[argv[0]])(), argv[1:]
    return mod.parser, argv


def test_the_docs_have_commands_for_every_script():
    assert {s for _, s, _ in COMMANDS} == set(SCRIPTS), {s for _, s, _ in COMMANDS}
    assert len(COMMANDS) > 60


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w} {s}" for w, s, _ in COMMANDS])
def test_documented_command_parses(where, script, argv, capsys):
    p, rest = parser_for(script, argv)
    if {"-h", "--help"} & set(rest):
        return
    p = copy.deepcopy(p)  # the trainers' module-level parser is shared with the in-process tests
    p.exit_on_error = False
    try:
        args, unknown = p.parse_known_args(rest)
    except (argparse.ArgumentError, SystemExit) as e:
        pytest.fail(f"{where}: python {script} {shlex.join(argv)}: {e} {capsys.readouterr().err}")
    # memory_optimizer.py start and plan pass the trainer's flags on; everything else must be known
    if not (script == "memory_optimizer.py" and argv[:1] in (["start"], ["plan"])):
        assert not unknown, f"{where}: python {script} {shlex.join(argv)}: unknown {unknown}"
