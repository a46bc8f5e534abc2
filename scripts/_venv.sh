# Sourced by the other scripts: makes .venv (once) with isopace and every extra installed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip || true
    .venv/bin/python -m pip install --quiet -e ".[dev,postgres,redis,cli,uvloop]"
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
