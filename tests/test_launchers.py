"""run.sh and start_training.bat: thin launchers that offer the same commands (STYLE.md 16) and hand
Python's exit code back (2 for a user mistake). The .bat cannot run here: its shape is checked."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_sh(*args):
    return subprocess.run(["bash", str(ROOT / "run.sh"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_help_exits_0_and_an_unknown_command_is_one_error_line():
    for words in ([], ["help"], ["--help"], ["-h"]):
        p = run_sh(*words)
        assert p.returncode == 0 and "./run.sh demo" in p.stdout and not p.stderr, (words, p)
    p = run_sh("bogus")
    assert p.returncode == 2 and not p.stdout
    assert p.stderr.strip() == 'error: unknown command "bogus"; ./run.sh help lists them'


def test_start_training_bat_offers_run_sh_commands_and_passes_exit_codes_on():
    sh = (ROOT / "run.sh").read_text()
    bat = (ROOT / "start_training.bat").read_text()
    # run.sh's case arms, but its help arm
    arms = {w for arm in re.findall(r"^  ([\w|-]+)\)", sh, re.M) for w in arm.split("|")} - {"help", "-h", "--help"}
    (dispatch,) = re.findall(r"^for %%c in \(([^)]*)\) do if \"%cmd%\"==\"%%c\" goto cmd_%cmd%$", bat, re.M)
    assert set(dispatch.split()) == arms
    labels = set(re.findall(r"^:cmd_(\S+)$", bat, re.M))
    assert labels == arms
    # %errorlevel% inside a ( ) block is expanded before the block runs: it would return 0 whatever Python did
    depth = 0
    for line in bat.splitlines():
        if depth and "%errorlevel%" in line.lower():
            pytest.fail(f"%errorlevel% inside a ( ) block: {line.strip()}")
        depth += line.count("(") - line.count(")") if not line.lstrip().lower().startswith(("rem", "echo")) else 0
    # the extra flags reach every command, as "$@" does in run.sh
    for label in ("demo", "test", "monitor", "watch", "gru"):
        body = bat.split(f":cmd_{label}\n")[1].split("\n:")[0] if label != "gru" else bat.split(":cmd_sft\n")[1]
        assert "%rest%" in body, label
