"""scripts/setup.sh with no package index answering: a copy of the project builds its .venv
from the wheels an earlier set-up on this machine kept, and says so; with none kept it fails
with pip's reason."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path(os.environ.get("KHOFS_WHEELS") or
              Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "khofs/wheels")


def project_copy(dst: Path) -> Path:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dst / name)
    for name in ("khofs", "scripts"):
        shutil.copytree(REPO / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def offline_setup(proj: Path, wheels: Path, tmp: Path):
    nolinks = tmp / "no-links"
    nolinks.mkdir(exist_ok=True)
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
               PIP_FIND_LINKS=str(nolinks), PIP_RETRIES="0", PIP_TIMEOUT="2",
               KHOFS_WHEELS=str(wheels))
    return subprocess.run([str(proj / "scripts/setup.sh")], env=env, capture_output=True,
                          text=True, timeout=300)


def test_a_venv_from_the_kept_wheels(tmp_path):
    # the set-up that runs these tests kept them (or used them itself)
    assert any(WHEELS.glob("pyfuse3-*.whl")), f"no pyfuse3 wheel kept in {WHEELS}"
    proj = project_copy(tmp_path)
    r = offline_setup(proj, WHEELS, tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"setup: no package index answered; installed from the wheels kept in {WHEELS}" \
        in r.stderr.splitlines()
    out = subprocess.run([str(proj / ".venv/bin/python"), "-c",
                          "import khofs, pyfuse3, libfdt, fdt, trio, pytest; print(khofs.__file__)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path / "no-links",
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout
    assert out.strip() == str(proj / "khofs/__init__.py")     # the editable install of the copy


def test_no_kept_wheels_fails_with_pips_reason(tmp_path):
    proj = project_copy(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = offline_setup(proj, empty, tmp_path)
    assert r.returncode == 1
    assert "setup: installing khofs and its Python dependencies into .venv" in r.stderr
    assert "No matching distribution found" in r.stderr
    assert not (proj / ".venv/.khofs-installed").exists()
