"""benchmarks/soak.py: a short soak (2 SIGKILLs on the GRU trainer) resumes bit-exactly, and the
comparison it relies on does see a one-digit change in a loss or a weight."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import soak  # noqa: E402


def test_soak_two_kills_bit_exact_and_a_change_is_seen(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "soak.py"), "--kills", "2", "--trainers", "gru",
                        "--seed", "1", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^soak: (\d+) of (\d+) trials bit-exact \(2 kills\)$", p.stdout, re.M)
    assert m and m[1] == m[2] and int(m[2]) >= 1, p.stdout
    assert re.search(r"^\| gru \| \d+ \| 2 \| \d+ \| \d+ \| \d+ \| 0 \|$", p.stdout, re.M), p.stdout

    # the reference folder is kept: a copy of it is exact, and one changed digit is not
    ref, copy = tmp_path / "gru" / "reference", tmp_path / "copy"
    shutil.copytree(ref, copy)
    assert soak.first_difference(ref, copy) is None
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[2])
    rec["loss"] += 1e-6
    (copy / "metrics.jsonl").write_text("\n".join(lines[:2] + [json.dumps(rec)] + lines[3:]) + "\n")
    assert "metrics.jsonl record 3" in soak.first_difference(ref, copy)

    shutil.copy(ref / "metrics.jsonl", copy / "metrics.jsonl")
    name, _ = soak.final_model(copy)
    state = torch.load(copy / "checkpoints" / name, weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first].view(-1)[0] += 1e-6
    torch.save(state, copy / "checkpoints" / name)
    assert f"model tensor {first!r} differs" in soak.first_difference(ref, copy)
