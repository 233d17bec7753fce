-- delete: $1 course_id, $2 If-Match tags, $3 If-None-Match tags (each null without the
--         header; '*' is any), $4 request id (for the change feed; passed by the service)
-- returns no row when the course does not exist; else `permitted`: whether the preconditions
-- held, and so the course was deleted (its enrollments with it: on delete cascade). The etag
-- is compared under the row's lock, so check and delete are one atomic step.
with request as (
    select set_config('enrollment.request_id', $4, true)
), target as (
    select id, course_etag(id, code, name, level, capacity, enrolled_count) as etag
      from courses
     where id = $1
       for update
), decided as (
    select coalesce($2::text[] && array[etag, '*'], true)
           and not coalesce($3::text[] && array[etag, '*'], false) as permitted
      from target
), deleted as (
    delete from courses
     using decided, request
     where courses.id = $1
       and decided.permitted
)
select permitted
  from decided
