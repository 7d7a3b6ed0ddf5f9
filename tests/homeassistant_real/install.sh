#!/usr/bin/env bash
# A Home Assistant core for tests/homeassistant_real/real_homeassistant.py, in its own
# virtualenv (never the project's: it pins hundreds of packages of its own).
#
#   tests/homeassistant_real/install.sh [DIR]      # default /var/tmp/pihub-homeassistant
#
# HA_VERSION (default 2024.3.3, the last release that runs on Debian 12's Python 3.11) and
# HA_PYTHON_BIN (default python3.11; 2024.4 to 2024.12 need python3.12) choose the release.
# Everything comes from PyPI, held to the release's own package_constraints.txt (without it pip
# backtracks for ever through unpinned Bluetooth libraries). Then the requirements of the
# integrations a minimal configuration loads (http, api, config, frontend, recorder, mqtt and
# their dependencies) are installed too, so that Home Assistant starts with --skip-pip, offline.
set -euo pipefail
DIR=${1:-/var/tmp/pihub-homeassistant}
HA_VERSION=${HA_VERSION:-2024.3.3}
HA_PYTHON_BIN=${HA_PYTHON_BIN:-python3.11}
if [ -x "$DIR/venv/bin/python" ] && "$DIR/venv/bin/python" -c "
import sys, homeassistant.const as c; sys.exit(c.__version__ != '$HA_VERSION')" 2>/dev/null; then
  echo "Home Assistant $HA_VERSION is in $DIR/venv"
  exit 0
fi
started=$(date +%s)
rm -rf "$DIR/venv" "$DIR/wheels"
mkdir -p "$DIR/wheels"
"$HA_PYTHON_BIN" -m venv "$DIR/venv"
PIP=("$DIR/venv/bin/pip" install --quiet --disable-pip-version-check)
"$DIR/venv/bin/pip" download --quiet --no-deps "homeassistant==$HA_VERSION" -d "$DIR/wheels"
wheel=$(ls "$DIR"/wheels/homeassistant-"$HA_VERSION"-*.whl)
"$DIR/venv/bin/python" - "$wheel" "$DIR/constraints.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    open(sys.argv[2], "wb").write(wheel.read("homeassistant/package_constraints.txt"))
PY
"${PIP[@]}" "$wheel" -c "$DIR/constraints.txt"
"$DIR/venv/bin/python" - > "$DIR/integrations.txt" <<'PY'
"""Requirements of the integrations a minimal configuration loads, and of their dependencies."""
import json
from pathlib import Path

import homeassistant.bootstrap as bootstrap
import homeassistant.components as components

root = Path(components.__path__[0])
todo = {"mqtt", "api", "config", "http", "frontend", "recorder"}
for name in ("CORE_INTEGRATIONS", "DEFAULT_INTEGRATIONS", "DEFAULT_INTEGRATIONS_RECOVERY_MODE",
             "DEFAULT_INTEGRATIONS_SUPERVISOR", "LOGGING_AND_HTTP_DEPS_INTEGRATIONS",
             "FRONTEND_INTEGRATIONS", "RECORDER_INTEGRATIONS", "STAGE_1_INTEGRATIONS"):
    todo |= set(getattr(bootstrap, name, set()))
seen, requirements = set(), set()
while todo:
    domain = todo.pop()
    manifest = root / domain / "manifest.json"
    if domain in seen or not manifest.exists():
        continue
    seen.add(domain)
    data = json.loads(manifest.read_text())
    requirements |= set(data.get("requirements", []))
    todo |= set(data.get("dependencies", []))
print("\n".join(sorted(requirements)))
PY
# josepy 2 dropped what the acme of these releases imports (hass-nabucasa, at every request)
"${PIP[@]}" -r "$DIR/integrations.txt" "josepy<2" -c "$DIR/constraints.txt"
echo "Home Assistant $HA_VERSION installed in $DIR/venv in $(( $(date +%s) - started )) s"
