-- enrollment_json: the body of an enrollment response, byte for byte as the service's encoder
-- (msgspec) writes the Enrollment struct: keys in field order, no spaces, enrolled_at in UTC
-- ending in "Z", with microseconds only when there are any. For the statement that enrolls and
-- stores the 201 under its Idempotency-Key at once (sql/enrollments/enroll_keyed), so that the
-- answer and its replay are the same bytes. tests/test_idempotency.py holds it to the encoder.
-- `stable`, not immutable: to_char is. Harmless when run again.
-- depends: 0006.idempotency-keys

create or replace function enrollment_json(
    student_id bigint, course_id bigint, enrolled_at timestamptz
) returns bytea
language sql stable parallel safe
as $$
    select convert_to(
        '{"student_id":' || student_id::text
        || ',"course_id":' || course_id::text
        || ',"enrolled_at":"'
        || to_char(enrolled_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || case
               when extract(microseconds from enrolled_at at time zone 'UTC')::bigint % 1000000 = 0
               then ''
               else to_char(enrolled_at at time zone 'UTC', '.US')
           end
        || 'Z"}',
        'UTF8')
$$;
