"""benchmarks/gpu_check.py on a machine without CUDA: one line that says so, exit 0, nothing else.
(With CUDA the script runs every trainer for minutes: that is a manual check, not a test.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is visible: gpu_check.py would run its real checks")
def test_gpu_check_without_cuda_is_one_line_and_exit_0():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device visible to PyTorch"), p.stdout
    # stderr is not checked: a CUDA build of torch on a machine without a driver warns there itself
    assert lines[0].endswith("nothing to check"), p.stdout
