"""benchmarks/soak.py: a short soak (2 SIGKILLs on the GRU trainer, both aimed at checkpoint
writes) lands every kill after the first checkpoint and mid-save, resumes bit-exactly, and the
comparison it relies on does see a one-digit change in a loss or a weight; what counts as a
complete checkpoint and as a write under way."""
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
                        "--seed", "1", "--aim", "1", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"^soak: (\d+) of (\d+) trials bit-exact \(2 kills\)$", p.stdout, re.M)
    assert m and m[1] == m[2] and int(m[2]) >= 1, p.stdout
    # trials | kills | after the first checkpoint | mid-save | runs resumed | exact | not exact: every kill
    # is aimed at a write, which comes after the first checkpoint and, in a re-run, after its resume
    assert re.search(r"^\| gru \| \d+ \| 2 \| 2 \| 2 \| 2 \| \d+ \| 0 \|$", p.stdout, re.M), p.stdout
    assert re.search(r"^targets met: 2 kills after the first checkpoint \(want >= 2\), 2 mid-save \(want >= 1\)$",
                     p.stdout, re.M), p.stdout

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


def test_a_complete_checkpoint_has_its_sidecar_and_a_leftover_tmp_is_no_write(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert soak.checkpointed(ckpts) == 0 and not soak.writes(ckpts)  # no folder yet
    ckpts.mkdir()
    (ckpts / "ckpt_step00000002.pt.tmp").write_bytes(b"x")
    assert soak.writes(ckpts) and soak.checkpointed(ckpts) == 0
    (ckpts / "ckpt_step00000002.pt.tmp").rename(ckpts / "ckpt_step00000002.pt")
    (ckpts / "best.pt.sha256").write_text("0\n")
    assert not soak.writes(ckpts) and soak.checkpointed(ckpts) == 0  # renamed, its checksum not written
    (ckpts / "ckpt_step00000002.pt.sha256").write_text("0\n")
    assert soak.checkpointed(ckpts) == 2

    # a killed run's ckpt_step4.pt.tmp is no write of the re-run's; the re-run's own, of that name, is
    (ckpts / "ckpt_step00000004.pt.tmp").write_bytes(b"x")
    left = soak.writes(ckpts)
    assert left and not soak.writes(ckpts, left)
    (ckpts / "ckpt_step00000004.pt.tmp").unlink()  # as start_run does
    (ckpts / "best.pt.tmp").write_bytes(b"y")
    assert soak.writes(ckpts, left) and not soak.writes(ckpts, left, step=4)  # best.pt of step 2's save
    (ckpts / "ckpt_step00000004.pt.tmp").write_bytes(b"xy")
    os.utime(ckpts / "ckpt_step00000004.pt.tmp", ns=(1, 1))  # another mtime: in a soak it comes seconds later
    assert soak.writes(ckpts, left, step=4) and not soak.writes(ckpts, left, step=6)
