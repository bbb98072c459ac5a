#!/usr/bin/env bash
# CI setup for the Docker tests: install Docker and debootstrap, start dockerd,
# build the local base image and the envfleet image. Idempotent: every step is
# skipped when its result is already there, and docker's layer cache makes the
# image rebuild quick when only envfleet's code changed.
#
# Run it (.ci/docker.sh) or source it (. .ci/docker.sh) from the repo root,
# after envfleet and its dependencies are installed in $PYTHON's environment.
# Never pulls an image: the base is made with debootstrap (deploy/build-base-image.sh).
#
# env: PYTHON      interpreter with envfleet importable (default: python3)
#      IMAGE       tag to build (default: envfleet:latest)
#      BASE_IMAGE  base image (default: envfleet-base:bookworm, built here when missing)

envfleet_docker_setup() (
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local started=$SECONDS step
  local python=${PYTHON:-python3} image=${IMAGE:-envfleet:latest}
  local base=${BASE_IMAGE:-envfleet-base:bookworm}
  local sock=/var/run/docker.sock
  local sudo=""
  [[ $(id -u) == 0 ]] || sudo="sudo"

  say() { echo "[docker-setup $((SECONDS - started))s] $*"; }
  ping() { curl -sf -m 2 --unix-socket "$sock" http://localhost/_ping >/dev/null 2>&1; }

  step=$SECONDS
  if [[ -x /usr/sbin/dockerd ]] && command -v debootstrap >/dev/null && command -v curl >/dev/null; then
    say "docker.io and debootstrap already installed"
  else
    say "installing docker.io debootstrap"
    $sudo apt-get update -q >/dev/null
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      docker.io debootstrap curl ca-certificates >/dev/null
    say "installed in $((SECONDS - step)) s"
  fi

  step=$SECONDS
  if ping; then
    say "dockerd is running"
  else
    say "starting dockerd"
    # --userland-proxy=false: published ports via iptables, no docker-proxy per port.
    # DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1: swarm tasks use local images, never pull.
    $sudo mkdir -p /var/log
    # A daemon killed hard (as at the end of a session) leaves pid files behind that make
    # the next dockerd refuse to start; remove them when their process is gone.
    local pidfile pid
    for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
      if [[ -f $pidfile ]]; then
        pid=$(cat "$pidfile" 2>/dev/null || true)
        # gone, or a zombie nobody has reaped yet (state Z in /proc/PID/stat)
        if [[ -z $pid || ! -r /proc/$pid/stat ]] || [[ $(sed 's/.*) //' "/proc/$pid/stat" | cut -d' ' -f1) == Z ]]; then
          say "removing stale $pidfile"
          $sudo rm -f "$pidfile"
        fi
      fi
    done
    $sudo env DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 setsid nohup /usr/sbin/dockerd \
      --userland-proxy=false >/var/log/dockerd.log 2>&1 </dev/null &
    echo $! | $sudo tee /run/envfleet-dockerd.pid >/dev/null
    local i
    for i in $(seq 1 300); do   # at most ~30 s
      ping && break
      sleep 0.1
    done
    if ! ping; then
      echo "dockerd did not become ready within 30 s; last log lines:" >&2
      tail -20 /var/log/dockerd.log >&2 || true
      exit 1
    fi
    say "dockerd ready in $((SECONDS - step)) s"
  fi

  step=$SECONDS
  if [[ $base == envfleet-base:bookworm ]]; then
    $sudo bash deploy/build-base-image.sh "$base" | sed "s/^/  /"
    say "base image step took $((SECONDS - step)) s"
  fi

  step=$SECONDS
  say "building $image on $base"
  if [[ $base == envfleet-base:bookworm ]]; then base_arg=None; else base_arg="'$base'"; fi
  "$python" -c "from rollout.commands.image import build_image; build_image(base=$base_arg, tag='$image')" \
    | grep -v '^  ' || { echo "image build failed" >&2; exit 1; }
  say "image step took $((SECONDS - step)) s"
  say "docker setup done in $((SECONDS - started)) s"
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  envfleet_docker_setup
else
  envfleet_docker_setup || return 1
fi
