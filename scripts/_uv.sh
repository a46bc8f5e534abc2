# Sourced by _venv.sh and upgrade: bootstraps uv (pinned and hash-checked by scripts/uv-bootstrap.txt)
# into .venv-uv with the machine's Python 3.11 and pip, and sets $uv to it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bootstrap=scripts/uv-bootstrap.txt
uv="$root/.venv-uv/bin/uv"
if [ ! -x "$uv" ] || [ "$bootstrap" -nt "$uv" ]; then
    python3 -m venv --clear .venv-uv
    PIP_CONFIG_FILE=/dev/null .venv-uv/bin/python -m pip install --quiet --disable-pip-version-check \
        --require-hashes --only-binary :all: -r "$bootstrap"
    touch "$uv"
fi
export UV_PYTHON_DOWNLOADS=never     # use this machine's Python 3.11, never fetch an interpreter
export UV_PROJECT_ENVIRONMENT="$root/.venv"
