#!/bin/sh
# The `scale` profile's Redis Cluster (docker-compose.yml), made once: the three primaries at
# their fixed addresses share the 16384 slots. A cluster already made (a restart, a second `up`:
# its nodes know their slots from nodes.conf, even while they still say `cluster_state:fail`
# for the moment after a start) is left as it is.
set -eu
for node in "$@"; do
	until redis-cli -h "${node%:*}" -p "${node#*:}" ping >/dev/null 2>&1; do sleep 1; done
done
first=$1
if redis-cli -h "${first%:*}" -p "${first#*:}" cluster info | grep -q '^cluster_slots_assigned:16384'; then
	echo 'redis-cluster: already made'
	exit 0
fi
redis-cli --cluster create "$@" --cluster-yes
until redis-cli -h "${first%:*}" -p "${first#*:}" cluster info | grep -q '^cluster_state:ok'; do sleep 1; done
echo 'redis-cluster: made'
