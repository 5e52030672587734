#!/usr/bin/env bash
# Write constraints.txt from ./.venv: the exact release of every installed package (but malora_dist
# itself), which launch/setup_env.sh then installs. Refresh it on purpose, in its own commit, after
# the whole suite passed in this venv, e.g. against the newest releases:
#   MALORA_UNLOCKED=1 bash launch/setup_env.sh && .venv/bin/python -m pytest -q && bash launch/refresh_lock.sh
# torch is written without its build label (2.13.0, not 2.13.0+cpu), so the lock admits the CPU
# and the CUDA builds of the tested release.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
{
  echo "# The releases the malora_dist test suite passed with; launch/setup_env.sh installs through this."
  echo "# Made by launch/refresh_lock.sh on $(date -u +%Y-%m-%d); do not edit by hand."
  echo "# python: $("$python" -c 'import platform; print(platform.python_version(), platform.machine(), platform.system())')"
  "$python" -m pip freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
