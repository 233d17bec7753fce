-- enroll_keyed: $1 student_id, $2 course_id, $3 scope, $4 Idempotency-Key, $5 fingerprint,
--               $6 seconds to keep the outcome, $7 the enrollment's location,
--               $8 request id (for the change feed; passed by the service)
-- enroll.sql for a request sent with an Idempotency-Key: when it creates the enrollment, the
-- same statement stores the 201 under the key, so the change and its key commit together in one
-- round trip. Returns enroll.sql's row plus `body`, the stored 201's body (null when nothing was
-- created: already enrolled, which the service then stores like any refusal).
-- A key already held, live or expired, fails the whole statement on idempotency_keys_pkey and
-- undoes the enrollment with it: the service then takes the general path (the request in a
-- transaction, the key stored last), which replays or re-stores as the key's state says.
-- Every other refusal is reported as in enroll.sql, and stores nothing.
with request as (
    select set_config('enrollment.request_id', $8, true)
), enrolled as (
    insert into student_courses as sc (student_id, course_id)
    select $1, $2
      from request
        on conflict (student_id, course_id)
        do update set enrolled_at = sc.enrolled_at
    returning enrolled_at, (xmax = 0) as created
), stored as (
    insert into idempotency_keys
           (scope, key, fingerprint, status, content_type, location, body, expires_at)
    select $3, $4, $5, 201, 'application/json', $7,
           enrollment_json($1, $2, enrolled.enrolled_at),
           now() + make_interval(secs => $6)
      from enrolled
     where enrolled.created
    returning body
)
select enrolled.enrolled_at, enrolled.created, stored.body
  from enrolled
  left join stored on true
