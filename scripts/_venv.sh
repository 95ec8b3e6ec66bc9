# Shared by the scripts: make ./.venv with sagaline and the given extras installed.
# Usage: source scripts/_venv.sh EXTRAS   (EXTRAS: "all" for every driver, or "dev", which
# includes them; "" installs the core only, SQLite)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "sagaline needs Python 3.11 or newer as '$python' (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x "$root/.venv/bin/python" ]; then
  "$python" -m venv "$root/.venv"
fi
spec="$root"
[ -n "${1:-}" ] && spec="$root[$1]"
stamp="$root/.venv/.installed-${1:-base}"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec"
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
cd "$root"
