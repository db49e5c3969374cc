#!/bin/sh
# The `scale` profile's Redis Cluster (docker-compose.yml), made once: the three primaries at
# their fixed addresses share the 16384 slots. A cluster already made (a restart, a second `up`)
# is left as it is.
set -eu
for node in "$@"; do
	until redis-cli -h "${node%:*}" -p "${node#*:}" ping >/dev/null 2>&1; do sleep 1; done
done
first=$1
if redis-cli -h "${first%:*}" -p "${first#*:}" cluster info | grep -q '^cluster_state:ok'; then
	echo 'redis-cluster: already made'
	exit 0
fi
redis-cli --cluster create "$@" --cluster-yes
until redis-cli -h "${first%:*}" -p "${first#*:}" cluster info | grep -q '^cluster_state:ok'; do sleep 1; done
echo 'redis-cluster: made'
