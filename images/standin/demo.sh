#!/usr/bin/env bash
# `make demo` (after scripts/setup.sh demo): builds the stand-in Pi, starts it as container
# pihub-demo, provisions it with playbooks/site.yml exactly as a Pi (example inventory, example
# vault, whose placeholders only a stand-in may use: pihub_allow_demo_secrets; the outside world
# served by local fixtures, as in Molecule), then shows the live stack and leaves it running,
# printing the one command that stops it.
#
# A second run on a warm machine is fast: when pihub-demo runs and was provisioned from the
# same files (roles, playbooks, inventory, the package, the fixtures), nothing is redone.
# FORCE=1 provisions again. DEMO_SECONDS (default 20) of live heartbeats are shown at the end.
#
# Exit codes with one sentence: 75 the demo's port on 127.0.0.1 is taken, 71 Docker cannot run
# a systemd container here.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"

container=${PIHUB_DEMO_CONTAINER:-pihub-demo}
image=${PIHUB_STANDIN_IMAGE:-pihub-standin:bookworm}
seconds=${DEMO_SECONDS:-20}
heartbeat=${DEMO_HEARTBEAT:-10}
# The page of pihub-web in the stand-in, published on this port of the host's 127.0.0.1.
port=${PIHUB_DEMO_PORT:-8080}
say() { printf '==> %s\n' "$*" >&2; }

# What the stand-in is provisioned from; a running demo with the same stamp is up to date.
stamp=$(git ls-files -z --cached --others --exclude-standard -- roles playbooks inventory \
  files/daemons molecule/default/prepare.yml images/standin | sort -z | xargs -0 sha256sum |
  sha256sum | cut -c1-16)
running_stamp=$(docker exec "$container" cat /etc/pihub-demo.stamp 2>/dev/null || true)

if [[ ${FORCE:-0} != 1 && $running_stamp == "$stamp" ]]; then
  say "$container runs and was provisioned from these files (stamp $stamp): nothing to do (FORCE=1 redoes it)"
else
  # A port taken by anything but an older demo stops here, before minutes of work.
  if [[ $(docker port "$container" 8080/tcp 2>/dev/null) != "127.0.0.1:$port" ]] &&
    python3 -c 'import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)
sys.exit(1)' "$port"; then
    echo "demo: port $port on 127.0.0.1 is taken by another program; free it, or choose another: make demo PIHUB_DEMO_PORT=8081" >&2
    exit 75
  fi

  images/standin/build.sh "$image"
  say "starting the stand-in Pi $container (systemd in Docker; page on 127.0.0.1:$port)"
  images/standin/run.sh "$container" "$image" -p "127.0.0.1:$port:8080"

  # The daemons' outside world on 127.0.0.1, as in Molecule: the stand-in fixtures (a GBFS feed,
  # a departures board, a Pushover receiver, a fake 1-wire bus) installed by Molecule's
  # prepare.yml, and the example's daemons pointed at them, GPIO simulated
  # (inventory/standin/overrides.yml, by name: pihub_daemon_overrides); nothing leaves the machine.
  inventory=(-i inventory/example -i inventory/demo --limit "$container")
  overrides=(-e @inventory/standin/overrides.yml)
  say "installing the stand-in fixtures in $container (molecule/default/prepare.yml)"
  ansible-playbook "${inventory[@]}" "${overrides[@]}" molecule/default/prepare.yml

  say "provisioning $container with playbooks/site.yml"
  start=$(date +%s)
  ansible-playbook "${inventory[@]}" \
    -e @inventory/example/group_vars/pihub/vault.yml.example "${overrides[@]}" \
    -e "{\"pihub_heartbeat_interval\": $heartbeat, \"pihub_allow_demo_secrets\": true}" playbooks/site.yml
  say "provisioned in $(($(date +%s) - start)) s"
  docker exec "$container" sh -c "echo $stamp > /etc/pihub-demo.stamp"
fi

# The first daemon's login (any daemon may read pihub/#), from inside the container.
first=$(docker exec "$container" sh -c 'ls /etc/pihub/*.yml | head -n1 | xargs -n1 basename | sed "s/\.yml$//"')
say "live: heartbeats on pihub/+/meta and statuses for ${seconds} s (from inside $container):"
docker exec "$container" sh -c '
  exec timeout "$1" mosquitto_sub -h 127.0.0.1 -u "pihub-$2" -P "$(cat /etc/pihub/secrets/$2.mqtt)" \
    -t "pihub/+/meta" -t "pihub/+/status" -v' sh "$seconds" "$first" || [[ $? == 124 ]]

if docker exec "$container" test -e /etc/pihub/web.yml; then
  # the example vault's login (its hash is of this password; never a Pi's: the play refuses it)
  say "the page: http://127.0.0.1:$port/  login: admin / pihub-demo  (kiosk: /boards?kiosk=1)"
fi
say "the hub keeps running in $container: docker exec -it $container bash (a shell on the stand-in Pi)"
say "stop it with: docker rm -f $container"
