#!/bin/sh
# The `scale` profile's read replica (docker-compose.yml): a hot standby of `postgres`. Its first
# start clones the primary (pg_basebackup -R writes standby.signal and the connection back) into
# a directory moved into place only once the clone is whole; every later start streams from
# where it stopped, the primary keeping the WAL it needs in the slot `compose_replica` (up to its
# max_slot_wal_keep_size: a replica away longer must be cloned again — remove its volume). A
# clone starts with a slot of its own: the one an earlier clone left, unused now and perhaps
# past that bound (PostgreSQL's "lost"), is dropped first. The same steps as
# deploy/k8s/components/read-replica's init container.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
	export PGPASSWORD="$POSTGRES_PASSWORD"
	until pg_isready -q -h postgres -U "$POSTGRES_USER" -d "$POSTGRES_DB"; do sleep 1; done
	rm -rf "$PGDATA.new"
	psql -h postgres -U "$POSTGRES_USER" -d "$POSTGRES_DB" -Atq -c "SELECT pg_drop_replication_slot(slot_name)
		FROM pg_replication_slots WHERE slot_name = 'compose_replica' AND NOT active" >/dev/null
	pg_basebackup -h postgres -U "$POSTGRES_USER" -D "$PGDATA.new" -R -X stream -c fast -S compose_replica -C
	mv "$PGDATA.new" "$PGDATA"
	echo 'postgres-replica: cloned from postgres'
fi
exec postgres "$@"
