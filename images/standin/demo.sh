#!/usr/bin/env bash
# `make demo`: builds the stand-in Pi, starts it as container pihub-demo, provisions it with
# playbooks/site.yml exactly as a Pi (example inventory, example vault, whose placeholders only a
# stand-in may use: pihub_allow_demo_secrets; the outside world served by local fixtures, as in
# Molecule), then shows the heartbeats of every daemon for DEMO_SECONDS (default 60) from inside
# the container.
# The container keeps running afterwards; remove it with `docker rm -f pihub-demo`.
set -euo pipefail
cd "$(dirname "$0")/../.."

container=${PIHUB_DEMO_CONTAINER:-pihub-demo}
image=${PIHUB_STANDIN_IMAGE:-pihub-standin:bookworm}
seconds=${DEMO_SECONDS:-60}
heartbeat=${DEMO_HEARTBEAT:-10}

images/standin/build.sh "$image"
images/standin/run.sh "$container" "$image"

# The daemons' outside world on 127.0.0.1, as in Molecule: the stand-in fixtures (a GBFS feed, a
# departures board, a Pushover receiver, a fake 1-wire bus) installed by Molecule's prepare.yml,
# and the example's daemons pointed at them, GPIO simulated (inventory/standin/overrides.yml, by
# name: pihub_daemon_overrides); nothing leaves the machine.
inventory=(-i inventory/example -i inventory/demo --limit "$container")
overrides=(-e @inventory/standin/overrides.yml)
echo "==> installing the stand-in fixtures in $container (molecule/default/prepare.yml)" >&2
ansible-playbook "${inventory[@]}" "${overrides[@]}" molecule/default/prepare.yml

echo "==> provisioning $container with playbooks/site.yml" >&2
start=$(date +%s)
ansible-playbook "${inventory[@]}" \
  -e @inventory/example/group_vars/pihub/vault.yml.example "${overrides[@]}" \
  -e "{\"pihub_heartbeat_interval\": $heartbeat, \"pihub_allow_demo_secrets\": true}" playbooks/site.yml
echo "==> provisioned in $(($(date +%s) - start)) s" >&2

# The first daemon's login (any daemon may read pihub/#), from inside the container.
first=$(docker exec "$container" sh -c 'ls /etc/pihub/*.yml | head -n1 | xargs -n1 basename | sed "s/\.yml$//"')
echo "==> heartbeats on pihub/+/meta and statuses for ${seconds} s (from inside $container):" >&2
docker exec "$container" sh -c '
  exec timeout "$1" mosquitto_sub -h 127.0.0.1 -u "pihub-$2" -P "$(cat /etc/pihub/secrets/$2.mqtt)" \
    -t "pihub/+/meta" -t "pihub/+/status" -v' sh "$seconds" "$first" || [[ $? == 124 ]]
echo "==> $container keeps running: docker exec -it $container bash; docker rm -f $container" >&2
