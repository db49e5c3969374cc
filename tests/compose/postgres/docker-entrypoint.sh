#!/bin/sh
# The official postgres image's entrypoint, in brief: POSTGRES_USER, POSTGRES_PASSWORD,
# POSTGRES_DB and PGDATA; password (scram-sha-256) auth from any address; listens on 0.0.0.0.
set -eu
[ "${1#-}" != "$1" ] && set -- postgres "$@"
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
	mkdir -p "$PGDATA" /var/run/postgresql
	chown -R postgres:postgres "$PGDATA" /var/run/postgresql
	chmod 700 "$PGDATA"
	exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
	: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set}"
	user=${POSTGRES_USER:-postgres}
	db=${POSTGRES_DB:-$user}
	pw=$(mktemp)
	printf '%s\n' "$POSTGRES_PASSWORD" > "$pw"
	initdb -D "$PGDATA" -U "$user" --pwfile="$pw" -E UTF8 --locale=C.UTF-8 \
		--auth-local=trust --auth-host=scram-sha-256
	rm -f "$pw"
	echo 'host all all all scram-sha-256' >> "$PGDATA/pg_hba.conf"
	echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
	if [ "$db" != postgres ]; then
		echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | postgres --single -j -D "$PGDATA" postgres >/dev/null
	fi
	echo 'entrypoint: database initialised'
fi
exec "$@"
