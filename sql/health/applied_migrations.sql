-- applied_migrations: no parameters
-- returns the ids of the migrations yoyo has applied; fails with undefined_table before the first run
-- (run on the readiness check's own connection, after health/ping)
select migration_id
  from _yoyo_migration
