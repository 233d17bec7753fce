-- applied_migrations: no parameters
-- returns the ids of the migrations yoyo has applied; fails with undefined_table before the first run
select migration_id
  from _yoyo_migration
