-- patch: $1 student_id, $2 name or null (keep), $3 email or null (keep),
--        $4 If-Match tags, $5 If-None-Match tags (each null without the header; '*' is any),
--        $6 request id (for the change feed; passed by the service)
-- returns no row when the student does not exist; else the student as it now is, its etag, and
-- `permitted`: whether the preconditions held (when not, nothing was written).
-- The etag is compared under the row's lock (the update's own: enrollments' foreign-key checks
-- go on), so check and write are one atomic step. A patch that changes nothing writes nothing.
-- A duplicate email raises unique_violation on students_email_key, only once the
-- preconditions held.
with request as (
    select set_config('enrollment.request_id', $6, true)
), target as (
    select id, name, email, created_at, student_etag(id, name, email) as etag
      from students
     where id = $1
       for no key update
), decided as (
    select id, name, email, created_at, etag,
           coalesce($4::text[] && array[etag, '*'], true)
           and not coalesce($5::text[] && array[etag, '*'], false) as permitted
      from target
), updated as (
    update students
       set name  = coalesce($2, students.name),
           email = coalesce($3, students.email)
      from decided, request
     where students.id = $1
       and decided.permitted
       and (students.name, students.email)
           is distinct from (coalesce($2, students.name), coalesce($3, students.email))
    returning students.id, students.name, students.email, students.created_at,
              student_etag(students.id, students.name, students.email) as etag
)
select id, name, email, created_at, etag, true as permitted
  from updated
 union all
select id, name, email, created_at, etag, permitted
  from decided
 where not exists (select from updated)
