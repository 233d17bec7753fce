drop function if exists enrollment_json(bigint, bigint, timestamptz);
