"""The package as users get it: a wheel built from this tree installs into a fresh environment and runs."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_and_type_marker_are_in_the_tree():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert (ROOT / "src" / "normlab" / "py.typed").is_file()


def test_a_built_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    """Build the wheel, install it into a new venv without its
    dependencies, let that venv see this environment's packages (torch...) through a .pth file, and run it."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "--quiet"]
    # this environment's setuptools when it is recent enough for pyproject.toml (torch pulls one in), else PyPI's
    offline = int(metadata.version("setuptools").split(".")[0]) >= 77
    subprocess.run([*pip, "wheel", "--no-deps", *(["--no-build-isolation"] if offline else []), "--wheel-dir",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("normlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"normlab/py.typed", "normlab/datasets/names.txt", "normlab/cli.py"} <= set(names)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any(name.startswith("tests/") for name in names)

    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = fresh / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co, appended

    result = subprocess.run([str(fresh / "bin" / "normlab"), "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout and "export" in result.stdout
    probe = "import normlab, normlab.config; print(normlab.__file__)"
    where = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(fresh))  # the installed wheel, not this tree
    result = subprocess.run([str(python), "-m", "normlab", "presets"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "lesson-batchnorm" in result.stdout
