drop function if exists enrollment_batch(bigint[], bigint[], boolean[], boolean);
