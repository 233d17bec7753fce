-- json_timestamp: a timestamptz as the service's encoder (msgspec) writes a datetime in JSON,
-- quotes included: in UTC, ending in "Z", with six digits of microseconds only when there are
-- any. For the list statements that write their pages' JSON themselves
-- (sql/enrollments/list_for_student, sql/enrollments/roster); tests/test_json_pages.py holds
-- them to the encoder. One to_char: ".000000" can only be the fraction, the rest has no dot.
-- `stable`, not immutable: to_char is. A single expression, so PostgreSQL inlines it.
-- Harmless when run again.
-- depends: 0008.change-feed

create or replace function json_timestamp(t timestamptz) returns text
language sql stable parallel safe
as $$
    select '"' || replace(to_char(t at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '.000000', '')
           || 'Z"'
$$;
