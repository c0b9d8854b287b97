"""Golden losses: the first 20 training losses of a fixed-seed CPU run of every trainer, stored in
tests/data/golden_losses.json. They prove that moving code changed no numbers: a refactor that
reorders a random draw, a reduction or an initialisation shows up here as a different loss at
some step.

How close is close enough depends on the machine. On the CPU that wrote the file (its torch
version, vector unit and model are stored beside the losses) every loss must agree to 1e-5, as
torchtune's recipe tests do. On another CPU the kernels split their sums differently: between
two Xeons here the runs with causal attention (ASR, LM GPT, SFT) moved by up to 2.6e-4 by step
20, the others by at most 2e-6. There the bound is 1e-3, still under what a different seed moves
(at least 4.5e-3, the LoRA run; 5e-2 to 2.5 the others). A reordered reduction is caught only on
the CPU that wrote the file.

Regenerate only on purpose (a change that is meant to change the numbers), and say why in the
commit:

    python tests/test_golden_losses.py --write

One thread each: the sums inside a matmul are split differently with more threads, which moves
the last digits.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOLDEN = HERE / "data" / "golden_losses.json"
STEPS = ["--max-steps", "20", "--log-every", "1", "--seed", "0"]

# name -> script and flags. The SFT run trains on every 30th built-in pair (few.jsonl) so that
# its final greedy decoding of the test split takes seconds; the LoRA run fine-tunes the tiny
# DistilBERT checkpoint of tests/data/tiny_checkpoints.py (tiny/).
RUNS = {
    "gru": ["train_gru.py", "--quick"],
    "classifier": ["train_classifier.py", "--quick"],
    "classifier_transformer": ["train_classifier.py", "--quick", "--model", "small"],
    "classifier_lora": ["train_classifier.py", "--quick", "--pretrained", "tiny"],
    "asr": ["train_asr.py", "--quick"],
    "lm_gpt": ["train_lm.py", "--quick"],
    "lm_eigen": ["train_lm.py", "--quick", "--arch", "eigen"],
    "sft": ["train_sft.py", "--quick", "--data", "few.jsonl"],
}


def this_cpu():
    """What picks the kernels, and so the last digits: torch's version, its vector unit, the CPU model."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    fields = dict(reversed([[part.strip() for part in line.split(":", 1)] for line in info if ":" in line]))
    model = ", ".join(fields.get(k, "?") for k in ("model name", "model", "cache size"))
    if not fields:
        model = platform.processor()
    return f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {model}"


def fixtures(flags, d):
    """The files a run's flags name: few.jsonl, tiny/."""
    sys.path[:0] = [str(REPO), str(HERE / "data")]
    if "few.jsonl" in flags:
        import train_sft
        (d / "few.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train_sft.builtin_pairs()[::30]))
    if "tiny" in flags:
        import tiny_checkpoints
        tiny_checkpoints.write_checkpoint(d / "tiny", "distilbert", "safetensors")


def losses(name, d):
    """Run one trainer in d; its 20 logged training losses."""
    script, *flags = RUNS[name]
    fixtures(flags, d)
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(REPO / script), *flags, *STEPS, "--out", name], cwd=d, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    rows = [json.loads(l) for l in (d / name / "metrics.jsonl").read_text().splitlines() if l]
    return [r["loss"] for r in rows if "loss" in r and "step" in r and "val_loss" not in r][:20]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_losses(name, tmp_path):
    stored = json.loads(GOLDEN.read_text())
    golden, same_cpu = stored[name], stored["cpu"] == this_cpu()
    got = losses(name, tmp_path)
    assert len(got) == len(golden) == 20, (len(got), len(golden))
    worst = max(abs(a - b) for a, b in zip(got, golden))
    bound = 1e-5 if same_cpu else 1e-3
    assert worst <= bound, (f"{name}: losses moved by up to {worst:.2e} (bound {bound:g}: "
                            f"{'the' if same_cpu else 'not the'} CPU that wrote tests/data/golden_losses.json)\n"
                            f"golden {golden}\ngot    {got}\n(meant to change? python tests/test_golden_losses.py --write)")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_golden_losses.py --write   (rewrites tests/data/golden_losses.json)")
    with tempfile.TemporaryDirectory() as tmp:
        out = {"cpu": this_cpu()}
        for name in RUNS:
            (Path(tmp) / name).mkdir()
            out[name] = losses(name, Path(tmp) / name)
            print(f"{name}: {out[name][:3]} ...", file=sys.stderr)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
