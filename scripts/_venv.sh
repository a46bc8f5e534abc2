# Sourced by the other scripts: makes .venv from uv.lock, exactly, and puts it on PATH.
#
# Why uv: one lock file (uv.lock) pins every package the scripts install, the dev tools and the
# extras' packages with their transitive dependencies, to exact versions with hashes, for every
# platform at once; `uv sync --locked` installs exactly that and refuses a lock that no longer
# matches pyproject.toml instead of resolving again. uv itself is bootstrapped by _uv.sh.
source "$(dirname "${BASH_SOURCE[0]}")/_uv.sh"
if ! "$uv" lock --check --offline --quiet >/dev/null 2>&1 && ! "$uv" lock --check --quiet >/dev/null 2>&1; then
    echo "uv.lock does not match pyproject.toml: run ./scripts/upgrade (or .venv-uv/bin/uv lock) and commit uv.lock" >&2
    exit 1
fi
"$uv" sync --locked --all-extras --python python3 --quiet
export PATH="$root/.venv/bin:$PATH"
