#!/usr/bin/env bash
# CI setup for the browser tests (tests/envserver/test_web_browser.py): Debian's
# headless Chromium at /usr/bin/chromium plus fonts, and Playwright for Python to
# drive it. Never downloads a browser (no `playwright install`): Playwright is
# pointed at the Debian binary by the tests. Idempotent: each step is skipped
# when its result is already there.
#
# Run it (.ci/browser.sh) or source it (. .ci/browser.sh) from the repo root.
#
# env: PYTHON   interpreter whose environment needs playwright (default: .venv/bin/python);
#               `make install` already put it there through the `test` extra, so this
#               step is usually a check.

envfleet_browser_setup() (
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local started=$SECONDS step
  local python=${PYTHON:-$PWD/.venv/bin/python}
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"

  say() { echo "[browser-setup $((SECONDS - started))s] $*"; }

  step=$SECONDS
  if [[ -x /usr/bin/chromium ]] && fc-list 2>/dev/null | grep -qi dejavu; then
    say "chromium and fonts already installed ($(/usr/bin/chromium --version 2>/dev/null || echo '?'))"
  else
    say "installing chromium fonts-dejavu-core"
    $sudo apt-get update -q >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      chromium fonts-dejavu-core fontconfig >/dev/null
    say "installed in $((SECONDS - step)) s: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
  fi

  step=$SECONDS
  if ! command -v "$python" >/dev/null; then
    say "no $python (run make install first, or set PYTHON): playwright not checked"
  elif "$python" -c "import playwright.async_api" 2>/dev/null; then
    say "playwright for python already installed in $python"
  else
    say "installing playwright for python into $python (no browser download)"
    "$python" -m pip install -q "playwright>=1.40"
    say "installed in $((SECONDS - step)) s"
  fi
  say "browser setup done in $((SECONDS - started)) s"
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  envfleet_browser_setup
else
  envfleet_browser_setup || return 1
fi
