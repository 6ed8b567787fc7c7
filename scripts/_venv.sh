# Sourced by scripts/demo and scripts/test: create .venv (once) and install cloudckpt with the given extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "cloudckpt needs Python >= 3.10 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.x" >&2; exit 2; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing cloudckpt[$1] into .venv (first run takes a few minutes: TensorFlow) ..." >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$1]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  if [ "$1" = test ]; then
    # tf-keras (the multi-worker Keras test, TF_USE_LEGACY_KERAS=1) requires the `tensorflow` distribution by
    # name; installing it would put tensorflow next to tensorflow-cpu. Same module, so: no deps, same minor.
    tf_minor=$(.venv/bin/python -c 'import importlib.metadata as m
for d in ("tensorflow-cpu", "tensorflow"):
    try: print(".".join(m.version(d).split(".")[:2])); break
    except m.PackageNotFoundError: pass')
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "tf-keras==${tf_minor}.*" 2>&1 \
      | grep -v '^WARNING: Location' >&2 || true
  fi
  .venv/bin/python -c 'import cloudckpt' && touch "$stamp"
fi
