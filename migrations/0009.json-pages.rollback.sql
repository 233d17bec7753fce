drop function if exists json_timestamp(timestamptz);
