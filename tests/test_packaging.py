"""The built wheel carries the migrations and a non-editable install finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_migrations_and_installed_copy_uses_them(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("cwa-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("cwa/_migrations/"))
    expected = sorted(f"cwa/_migrations/{p.name}" for p in (REPO / "migrations").glob("*.sql"))
    assert shipped == expected and expected
    assert "cwa_cli/main.py" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    probe = (
        "import cwa.store.migrations as m, cwa; "
        "print(m.migrations_dir()); print(cwa.__file__); "
        "from cwa.store import Store; s = Store.open(r'%s'); print(s.info().schema_version)"
        % (tmp_path / "store")
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    mig_dir, module_file, version = run.stdout.strip().splitlines()
    assert mig_dir.startswith(str(target)) and module_file.startswith(str(target))
    assert int(version) == len(expected)
