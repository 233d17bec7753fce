-- delete: $1 student_id, $2 If-Match tags, $3 If-None-Match tags (each null without the
--         header; '*' is any), $4 request id (for the change feed; passed by the service)
-- returns no row when the student does not exist; else `permitted`: whether the preconditions
-- held, and so the student was deleted (its enrollments with it: on delete cascade). The etag
-- is compared under the row's lock, so check and delete are one atomic step.
with request as (
    select set_config('enrollment.request_id', $4, true)
), target as (
    select id, student_etag(id, name, email) as etag
      from students
     where id = $1
       for update
), decided as (
    select coalesce($2::text[] && array[etag, '*'], true)
           and not coalesce($3::text[] && array[etag, '*'], false) as permitted
      from target
), deleted as (
    delete from students
     using decided, request
     where students.id = $1
       and decided.permitted
)
select permitted
  from decided
