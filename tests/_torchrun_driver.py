"""torchrun in the distributed tests: the driver script (cwa CLI argv lists, in order, in one
process group) and its launch on 2 gloo CPU processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
from cwa_cli.main import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["cwa", *argv]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
"""


def launch(
    tmp_path: Path, commands: list[list[str]], nproc: int = 2
) -> subprocess.CompletedProcess:
    """Run ``commands`` under ``torchrun --standalone`` with ``nproc`` CPU ranks; skip the test
    when torchrun is not installed next to this Python, fail with its stderr when it fails;
    the finished process (its stdout is what rank 0 printed)."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed next to this Python")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    # The checkout first on the workers' path (an editable install may point elsewhere).
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CWA_MLFLOW": "0", "PYTHONPATH": path}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", str(nproc), str(driver),
         json.dumps(commands)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
