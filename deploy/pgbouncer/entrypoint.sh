#!/bin/sh
# Writes PgBouncer's auth_file from DB_USER and DB_PASSWORD, then replaces itself with the
# command (PgBouncer in the foreground, so it is PID 1 and gets the stop signal).
# PGBOUNCER_AUTH_FILE moves the file (the tests put it in a temporary folder).
set -eu
: "${DB_USER:?DB_USER must be set}"
: "${DB_PASSWORD:?DB_PASSWORD must be set}"
auth_file="${PGBOUNCER_AUTH_FILE:-/etc/pgbouncer/userlist.txt}"

# userlist.txt quotes each field in double quotes, doubling any double quote inside.
quote() {
    printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"
}

umask 077
printf '%s %s\n' "$(quote "$DB_USER")" "$(quote "$DB_PASSWORD")" > "$auth_file"
exec "$@"
