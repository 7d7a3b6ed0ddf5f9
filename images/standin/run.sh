#!/usr/bin/env bash
# Starts the stand-in Pi as a container running systemd, and waits until it has booted.
# Usage: images/standin/run.sh NAME [IMAGE] [docker run options, e.g. -p 127.0.0.1:8080:8080].
# An existing container of that name is replaced.
# No --privileged: these capabilities and mounts are enough for systemd and the units' sandboxing.
set -euo pipefail
name=${1:?container name}
image=${2:-pihub-standin:bookworm}
shift 2 || shift $#

docker rm -f "$name" >/dev/null 2>&1 || true
docker run -d --name "$name" --hostname "$name" \
  --cgroupns host --cap-add SYS_ADMIN --cap-add NET_ADMIN \
  --security-opt seccomp=unconfined \
  -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
  --tmpfs /run --tmpfs /run/lock --tmpfs /tmp \
  --stop-signal SIGRTMIN+3 "$@" \
  "$image" /lib/systemd/systemd >/dev/null

for _ in $(seq 60); do
  if [[ $(docker inspect -f '{{ .State.Running }}' "$name" 2>/dev/null) != true ]]; then
    docker logs --tail 10 "$name" >&2 || true
    echo "run.sh: Docker here cannot run a systemd container: $name stopped at once (it needs" \
      "cgroup v2 mounted read-write, CAP_SYS_ADMIN and seccomp=unconfined; a rootless or" \
      "locked-down Docker refuses them)" >&2
    exit 71
  fi
  state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
  case $state in
    running | degraded) echo "==> $name is up (systemd: $state)" >&2; exit 0 ;;
  esac
  sleep 1
done
echo "$name did not boot; last state: ${state:-none}" >&2
docker logs --tail 30 "$name" >&2
exit 1
