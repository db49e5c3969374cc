#!/bin/sh
# Minimal take on the official redis entrypoint. Without a config file redis-server binds every
# interface; the official image patches protected-mode off at build time, here it is an option
# placed before the caller's (after a config file, if one is given), so theirs still win.
set -eu
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
	shift
	if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then conf=$1; shift; set -- "$conf" --protected-mode no "$@"
	else set -- --protected-mode no "$@"; fi
	set -- redis-server "$@"
	if [ "$(id -u)" = 0 ]; then
		find . \! -user redis -exec chown redis '{}' +
		exec setpriv --reuid=redis --regid=redis --init-groups "$@"
	fi
fi
exec "$@"
