#!/usr/bin/env bash
# CI setup for the Python sandbox: install bubblewrap (Debian's `bubblewrap`), which puts every
# sandbox interpreter and grading process in namespaces of its own, and check that this machine
# lets it create them. Idempotent. Without it the sandbox falls back to plain child processes,
# and the isolation tests fail under CI=true.
set -euo pipefail
sudo=""
[[ $(id -u) == 0 ]] || sudo="sudo"
if command -v bwrap >/dev/null && [[ -x /usr/bin/setpriv ]]; then
  echo "[sandbox-setup] bubblewrap already installed"
else
  echo "[sandbox-setup] installing bubblewrap"
  $sudo apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends bubblewrap util-linux >/dev/null
fi
if bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev true; then
  echo "[sandbox-setup] bubblewrap can create namespaces here"
else
  echo "[sandbox-setup] bubblewrap cannot create namespaces on this machine (user namespaces refused?)" >&2
  exit 1
fi
