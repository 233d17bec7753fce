-- ping: no parameters
-- returns 1 when the database answers; run on the readiness check's own connection, never the
-- request pool, so that a busy pool does not read as a dead database
select 1
