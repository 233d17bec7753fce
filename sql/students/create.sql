-- create: $1 name, $2 email, $3 request id (for the change feed; passed by the service)
-- returns the new student, then its etag; a duplicate email raises unique_violation on
-- students_email_key
with request as (
    select set_config('enrollment.request_id', $3, true)
)
insert into students (name, email)
select $1, $2
  from request
returning id, name, email, created_at, student_etag(id, name, email) as etag
