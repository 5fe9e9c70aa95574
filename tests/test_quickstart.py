"""The README's quick start works for a new user on a stock Debian/Ubuntu Python.

The two commands (``bash .ci/book``, ``bash .ci/test``) prepare their Python environment with
``.ci/venv.sh``. Here they run in a fresh copy of the scripts, the way a new user would: ``PATH``
reduced to ``/usr/bin:/bin`` (only the system's ``python3``; no ``python`` command on Debian), no
active virtual or conda environment. The environment choice is checked with ``--dry-run``; one
real ``.venv`` is created with the system Python for a toy project (its own requirements.txt and
pyproject.toml, so no large download), installed, and not reinstalled until its requirements change.
The full install of the real pins is what CI does on every run (.ci/run calls ``bash .ci/test`` with
the same reduced PATH on a fresh clone).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SYSTEM_PATH = "/usr/bin:/bin"
SYSTEM_PYTHON = Path("/usr/bin/python3")
TEST_COMMAND = "python -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env tests book"


def system_python_version() -> str | None:
    if not SYSTEM_PYTHON.is_file():
        return None
    proc = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


SYSTEM_VERSION = system_python_version()
needs_system_python = pytest.mark.skipif(
    SYSTEM_VERSION is None or tuple(map(int, SYSTEM_VERSION.split("."))) < (3, 10),
    reason=f"no system {SYSTEM_PYTHON} >= 3.10 (found {SYSTEM_VERSION}) to play the new user's Python")


def new_user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a new user's shell would have it: only the system's PATH, no
    active environment, no PYTHONPATH (pip's own settings, e.g. its index, are kept)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME"} and not k.startswith("PYENV")}
    env["PATH"] = SYSTEM_PATH
    env.update(extra)
    return env


def fresh_copy(tmp_path: Path, toy: bool = False) -> Path:
    """A checkout without .venv: the real .ci scripts with the real pins, or (toy) a tiny project."""
    root = tmp_path / "clone"
    shutil.copytree(REPO / ".ci", root / ".ci")
    if toy:
        (root / "requirements.txt").write_text("# a toy project: nothing pinned\n")
        (root / "pyproject.toml").write_text(
            '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n\n'
            '[project]\nname = "toy_quickstart"\nversion = "0.1"\n\n'
            '[tool.setuptools]\npy-modules = ["toy_quickstart"]\n')
        (root / "toy_quickstart.py").write_text("ANSWER = 42\n")
    else:
        shutil.copy(REPO / "requirements.txt", root)
        shutil.copy(REPO / "pyproject.toml", root)
    return root


def run(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60):
    return subprocess.run(["/bin/bash", *args], cwd=root, env=env or new_user_env(),
                          capture_output=True, text=True, timeout=timeout)


def dry_run(root: Path, script: str, env: dict[str, str] | None = None) -> dict[str, str]:
    proc = run(root, script, "--dry-run", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)


@needs_system_python
def test_dry_run_picks_the_system_python3_and_a_project_venv(tmp_path):
    root = fresh_copy(tmp_path)
    for script, command in ((".ci/book", "jupyter-book build . -W --keep-going --all"),
                            (".ci/test", TEST_COMMAND)):
        plan = dry_run(root, script)
        assert plan == {"environment": str(root / ".venv"), "kind": "project environment",
                        "python": f"{SYSTEM_PYTHON} ({SYSTEM_VERSION})", "action": "create and install",
                        "command": command}, (script, plan)
    assert not (root / ".venv").exists(), "--dry-run created the environment"


@needs_system_python
def test_dry_run_uses_an_active_virtual_or_conda_environment(tmp_path):
    root = fresh_copy(tmp_path)
    venv = tmp_path / "my-venv"
    subprocess.run([str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(venv)], check=True)
    plan = dry_run(root, ".ci/test", new_user_env(VIRTUAL_ENV=str(venv)))
    assert (plan["environment"], plan["kind"], plan["action"]) == (str(venv), "active virtual environment", "install")
    conda = tmp_path / "conda-env"  # selection only looks for $CONDA_PREFIX/bin/python
    (conda / "bin").mkdir(parents=True)
    (conda / "bin" / "python").symlink_to(SYSTEM_PYTHON)
    plan = dry_run(root, ".ci/book", new_user_env(CONDA_PREFIX=str(conda)))
    assert (plan["environment"], plan["kind"]) == (str(conda), "active conda environment")
    assert not (root / ".venv").exists()


@needs_system_python
def test_missing_venv_module_is_explained_and_leaves_nothing(tmp_path):
    """Debian/Ubuntu without python3-venv: `import ensurepip` fails (here a module on PYTHONPATH does
    what the missing package does)."""
    root = fresh_copy(tmp_path)
    shadow = tmp_path / "no-ensurepip" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ensurepip'\")\n")
    env = new_user_env(PYTHONPATH=str(shadow.parent))
    for args in ((".ci/venv.sh",), (".ci/test", "--dry-run"), (".ci/book",)):
        proc = run(root, *args, env=env)
        assert proc.returncode != 0, (args, proc.stdout)
        assert "venv/ensurepip module is missing" in proc.stderr, (args, proc.stderr)
        assert re.search(r"apt install python3-venv\s+\(or python3\.\d+-venv\)", proc.stderr), proc.stderr
    assert not (root / ".venv").exists()


def test_no_usable_python_is_explained(tmp_path):
    root = fresh_copy(tmp_path)
    proc = run(root, ".ci/test", env=new_user_env(PYTHON="/bin/false"))
    assert proc.returncode != 0
    assert "need Python >= 3.10" in proc.stderr and "/bin/false (does not run)" in proc.stderr, proc.stderr
    assert not (root / ".venv").exists()


def test_broken_venv_is_reported_not_removed(tmp_path):
    root = fresh_copy(tmp_path)
    (root / ".venv").mkdir()
    (root / ".venv" / "notes.txt").write_text("mine")
    proc = run(root, ".ci/venv.sh")
    assert proc.returncode != 0 and "rm -rf" in proc.stderr and "does not run" in proc.stderr, proc.stderr
    assert (root / ".venv" / "notes.txt").read_text() == "mine"


@needs_system_python
@pytest.mark.timeout(300)
def test_creates_venv_installs_once_and_again_when_requirements_change(tmp_path):
    root = fresh_copy(tmp_path, toy=True)
    venv_python = root / ".venv" / "bin" / "python"

    first = run(root, ".ci/venv.sh", timeout=240)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"Creating {root / '.venv'} with {SYSTEM_PYTHON} (Python {SYSTEM_VERSION})" in first.stdout
    assert first.stdout.splitlines()[-1] == str(venv_python)
    probe = subprocess.run([str(venv_python), "-c", "import sys, toy_quickstart; "
                            "print(sys.base_prefix, sys.prefix != sys.base_prefix, toy_quickstart.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=new_user_env())
    base, in_venv, module = probe.stdout.split()
    assert (base, in_venv, module) == ("/usr", "True", str(root / "toy_quickstart.py")), probe.stdout + probe.stderr

    second = run(root, ".ci/venv.sh")
    assert second.returncode == 0 and "unchanged since the last install" in second.stdout, second.stdout
    assert "Installing" not in second.stdout
    assert dry_run(root, ".ci/test")["action"] == "none (up to date)"

    with open(root / "requirements.txt", "a") as f:
        f.write("# changed\n")
    assert dry_run(root, ".ci/test")["action"] == "install"
    third = run(root, ".ci/venv.sh", timeout=240)
    assert third.returncode == 0 and "Installing the pinned stack" in third.stdout, third.stdout + third.stderr
    assert "Creating" not in third.stdout


def test_readme_quick_start_is_the_two_scripts_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", readme, re.DOTALL)
    assert block, "README.md has no ```bash block under ## Quick start"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["bash .ci/book", "bash .ci/test"], commands
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert any(re.fullmatch(r"(env .*)?bash \.ci/test( \|\| status=\$\?)?", line) for line in ci), \
        ".ci/run does not call the README's test command"
    test_script = (REPO / ".ci" / "test").read_text()
    assert f'-m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env "$@"' in test_script
    assert "set -- tests book" in test_script
