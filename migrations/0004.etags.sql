-- The strong ETags of a student and a course: a content hash of every field of the
-- representation that can change (created_at never does), computed by the statement that reads
-- or writes the row, so an ETag changes exactly when the representation does, enrolled_count
-- included. Fields are joined with U+001F, which no stored text holds (the service refuses
-- control characters); a null capacity hashes as the empty string, which no number prints as.
-- `language sql immutable` with only immutable operators (no concat_ws, which is stable), so
-- PostgreSQL inlines them into each statement. Harmless when run again.
-- depends: 0003.validate-course-constraints

create or replace function student_etag(id bigint, name text, email text) returns text
language sql immutable parallel safe
as $$
    select md5(id::text || E'\x1f' || name || E'\x1f' || email)
$$;

create or replace function course_etag(
    id bigint, code text, name text, level text, capacity integer, enrolled_count integer
) returns text
language sql immutable parallel safe
as $$
    select md5(id::text || E'\x1f' || code || E'\x1f' || name || E'\x1f' || level
               || E'\x1f' || coalesce(capacity::text, '') || E'\x1f' || enrolled_count::text)
$$;
