"""A built wheel carries what a non-editable install needs: the run configs quickstart picks and the playground's
static files (a wrong package-data path once shipped a wheel without configs/*.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_configs_and_static_files(tmp_path):
    from tinystories.quickstart import CONFIG_DIR, pick_config

    # build from the tracked files alone, as from a fresh clone (no build/ or *.egg-info left by earlier builds)
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        dest = src / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest, follow_symlinks=False)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("tinystories-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "tinystories"
    for on_gpu in (False, True):
        cfg = pick_config(on_gpu)
        assert cfg.is_file() and cfg.relative_to(package).as_posix() in {n.removeprefix("tinystories/") for n in names}
    for f in [*CONFIG_DIR.glob("*.yaml"), *(package / "static").iterdir()]:
        assert f"tinystories/{f.relative_to(package).as_posix()}" in names, f
    # the repository's configs/ (used in every README command) is the packaged directory itself
    assert (REPO / "configs").resolve() == CONFIG_DIR.resolve()
