#!/usr/bin/env bash
# The project's Python environment, used by .ci/book and .ci/test (they source this file and call
# sc_env_setup). Run it directly to see or prepare the environment:
#
#   bash .ci/venv.sh --dry-run   say which Python and environment would be used and what would be
#                                installed; change nothing
#   bash .ci/venv.sh             prepare the environment and print its python
#
# Which environment:
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX): that one;
#   - otherwise the project's own .venv (ignored by git), created with the first of $PYTHON, python3,
#     python that runs and is Python >= 3.10. So a stock Debian/Ubuntu python3 works: it has no
#     `python` command, and its pip refuses to install outside a virtual environment (PEP 668).
# What is installed: requirements.txt (the pins), then `pip install -e .` (switch_core from this
# checkout). Only again when requirements.txt, pyproject.toml, the Python or the checkout's path
# changed: <environment>/.switch_core-install holds a hash of them, written after a successful install.

SC_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SC_MIN_PYTHON="3.10"

_sc_error() { echo "error: $*" >&2; }

# The Python's "X.Y.Z" when it runs and is >= SC_MIN_PYTHON (3.10); fails otherwise.
_sc_python_version() {
  "$1" -c 'import sys; v = sys.version_info; print("%d.%d.%d" % v[:3]); sys.exit(v < (3, 10))' 2>/dev/null
}

# Sets SC_BASE to the Python that creates .venv, or explains why there is none.
_sc_find_base_python() {
  local candidate path version tried=""
  local candidates=(python3 python)
  if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); fi  # chosen by the user: only that one
  for candidate in "${candidates[@]}"; do
    path="$(command -v "$candidate" 2>/dev/null)" || { tried+=" $candidate (not found);"; continue; }
    if version="$(_sc_python_version "$path")"; then
      SC_BASE="$path"
      SC_BASE_VERSION="$version"
      return 0
    fi
    version="$("$path" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)" || version="does not run"
    tried+=" $path ($version);"
  done
  _sc_error "need Python >= $SC_MIN_PYTHON to create $SC_REPO/.venv; tried:${tried%;}.
  Install one (Debian/Ubuntu: apt install python3 python3-venv), or point PYTHON=/path/to/python3 at it."
  return 1
}

_sc_missing_venv_message() {
  local minor
  minor="$("$SC_BASE" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || minor="3"
  _sc_error "$SC_BASE ($SC_BASE_VERSION) cannot create a virtual environment: its venv/ensurepip module is missing.
  On Debian/Ubuntu: sudo apt install python3-venv   (or python$minor-venv), then run this again.
  Or activate a virtual/conda environment of your own first: it is used as it is."
}

# Sets SC_ENV (the environment's prefix), SC_ENV_KIND and SC_PYTHON (may not exist yet: dry run).
_sc_choose_env() {
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    SC_ENV="$VIRTUAL_ENV" SC_ENV_KIND="active virtual environment"
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    SC_ENV="$CONDA_PREFIX" SC_ENV_KIND="active conda environment"
  else
    SC_ENV="$SC_REPO/.venv" SC_ENV_KIND="project environment"
  fi
  SC_PYTHON="$SC_ENV/bin/python"
}

_sc_install_hash() {
  "$SC_PYTHON" - "$SC_REPO" <<'EOF'
import hashlib, sys
repo = sys.argv[1]
h = hashlib.sha256()
for name in ("requirements.txt", "pyproject.toml"):
    with open(f"{repo}/{name}", "rb") as f:
        h.update(f.read())
h.update(f"{repo}\n{sys.version}\n{sys.prefix}\n".encode())
print(h.hexdigest())
EOF
}

_sc_up_to_date() {
  [ -f "$SC_ENV/.switch_core-install" ] && [ "$(cat "$SC_ENV/.switch_core-install")" = "$(_sc_install_hash)" ]
}

_sc_create_venv() {
  _sc_find_base_python || return 1
  if ! "$SC_BASE" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    _sc_missing_venv_message
    return 1
  fi
  echo "== Creating $SC_ENV with $SC_BASE (Python $SC_BASE_VERSION)"
  if ! "$SC_BASE" -m venv "$SC_ENV"; then
    rm -rf "$SC_ENV"  # it did not exist before this call: nothing of the user's is removed
    _sc_missing_venv_message
    return 1
  fi
}

_sc_install() {
  echo "== Installing the pinned stack (requirements.txt) and switch_core (pip install -e .) into $SC_ENV"
  rm -f "$SC_ENV/.switch_core-install"
  "$SC_PYTHON" -m pip install "pip>=21.3" \
    && "$SC_PYTHON" -m pip install -r "$SC_REPO/requirements.txt" \
    && "$SC_PYTHON" -m pip install -e "$SC_REPO" \
    || { _sc_error "installing into $SC_ENV failed (see pip's message above)"; return 1; }
  _sc_install_hash > "$SC_ENV/.switch_core-install"
}

# Prepare the environment and put it first on PATH. Sets SC_PYTHON.
sc_env_setup() {
  _sc_choose_env
  if [ "$SC_ENV_KIND" = "project environment" ]; then
    if [ -e "$SC_ENV" ] && ! _sc_python_version "$SC_PYTHON" >/dev/null; then
      _sc_error "$SC_ENV exists but $SC_PYTHON does not run (or is older than Python $SC_MIN_PYTHON).
  Move it away or delete it (rm -rf $SC_ENV), then run this again: it is recreated."
      return 1
    fi
    if [ ! -e "$SC_ENV" ]; then
      _sc_create_venv || return 1
    fi
  elif ! _sc_python_version "$SC_PYTHON" >/dev/null; then
    _sc_error "the $SC_ENV_KIND $SC_ENV has $("$SC_PYTHON" --version 2>&1); switch_core needs Python >= $SC_MIN_PYTHON"
    return 1
  fi
  if ! "$SC_PYTHON" -m pip --version >/dev/null 2>&1; then
    _sc_error "$SC_PYTHON has no pip: run '$SC_PYTHON -m ensurepip', or recreate the environment"
    return 1
  fi
  if _sc_up_to_date; then
    echo "== Using $SC_ENV ($SC_ENV_KIND): requirements.txt and pyproject.toml unchanged since the last install"
  else
    _sc_install || return 1
  fi
  export PATH="$SC_ENV/bin:$PATH"
  if [ "$SC_ENV_KIND" = "project environment" ]; then
    export VIRTUAL_ENV="$SC_ENV"
  fi
  unset PYTHONHOME
}

# What sc_env_setup would do, on stdout as key=value lines; changes nothing.
sc_env_dry_run() {
  _sc_choose_env
  echo "environment=$SC_ENV"
  echo "kind=$SC_ENV_KIND"
  if [ -e "$SC_ENV" ]; then
    if ! _sc_python_version "$SC_PYTHON" >/dev/null; then
      echo "python=$SC_PYTHON"
      echo "action=error: $SC_PYTHON does not run or is older than Python $SC_MIN_PYTHON"
      return 1
    fi
    echo "python=$SC_PYTHON ($(_sc_python_version "$SC_PYTHON"))"
    if _sc_up_to_date; then echo "action=none (up to date)"; else echo "action=install"; fi
    return 0
  fi
  _sc_find_base_python || { echo "action=error: no Python >= $SC_MIN_PYTHON"; return 1; }
  echo "python=$SC_BASE ($SC_BASE_VERSION)"
  if ! "$SC_BASE" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    _sc_missing_venv_message
    echo "action=error: venv/ensurepip missing"
    return 1
  fi
  echo "action=create and install"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # executed, not sourced
  set -euo pipefail
  case "${1:-}" in
    --dry-run) sc_env_dry_run ;;
    "") sc_env_setup && echo "$SC_PYTHON" ;;
    *) echo "usage: bash .ci/venv.sh [--dry-run]" >&2; exit 2 ;;
  esac
fi
