"""A built wheel carries what a non-editable install needs: the run configs quickstart picks and the playground's
static files (a wrong package-data path once shipped a wheel without configs/*.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from conftest import REPO, one_line_error, run_cli


def test_wheel_ships_configs_and_static_files(tmp_path):
    from tinystories.core.config import CONFIG_DIR
    from tinystories.quickstart import pick_config

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
    from tinystories.inference.server import STATIC_DIR

    for f in [*CONFIG_DIR.glob("*.yaml"), *STATIC_DIR.iterdir()]:
        assert f"tinystories/{f.relative_to(package).as_posix()}" in names, f
    # the repository's configs/ (used in every README command) is the packaged directory itself
    assert (REPO / "configs").resolve() == CONFIG_DIR.resolve()


def test_shipped_configs_load_by_name_outside_a_checkout(tmp_path):
    from tinystories.core.config import load_config

    # run from a directory without configs/: `--config configs/cpu.yaml` and `--config cpu.yaml` find the shipped copy
    for name in ("configs/cpu.yaml", "cpu.yaml"):  # the file loaded: the bad --set is what fails
        one_line_error(run_cli("train", "--config", name, "--set", "train.nope=3", cwd=tmp_path), "--set train.nope=3")
    assert load_config("cpu.yaml").model.dim == load_config(REPO / "configs" / "cpu.yaml").model.dim
    line = one_line_error(run_cli("train", "--config", "configs/gpu.yaml", cwd=tmp_path), "configs/gpu.yaml")
    assert "configs/cpu.yaml" in line and "configs/tinystories-23M.yaml" in line
