-- patch: $1 course_id, $2 code, $3 name, $4 level (each null to keep),
--        $5 whether capacity is being set, $6 the new capacity (null removes the limit),
--        $7 If-Match tags, $8 If-None-Match tags (each null without the header; '*' is any),
--        $9 request id (for the change feed; passed by the service)
-- returns no row when the course does not exist; else the course as it now is, its etag, and
-- `permitted`: whether the preconditions held (when not, nothing was written).
-- The etag is compared under the row's lock (the update's own: enrollments' foreign-key checks
-- go on), so check and write are one atomic step. A patch that changes nothing writes nothing.
-- Only once the preconditions held: a duplicate code raises unique_violation on
-- courses_code_key, and a capacity below enrolled_count raises check_violation on
-- courses_enrolled_within_capacity.
with request as (
    select set_config('enrollment.request_id', $9, true)
), target as (
    select id, code, name, level, capacity, enrolled_count, created_at,
           course_etag(id, code, name, level, capacity, enrolled_count) as etag
      from courses
     where id = $1
       for no key update
), decided as (
    select id, code, name, level, capacity, enrolled_count, created_at, etag,
           coalesce($7::text[] && array[etag, '*'], true)
           and not coalesce($8::text[] && array[etag, '*'], false) as permitted
      from target
), updated as (
    update courses
       set code     = coalesce($2, courses.code),
           name     = coalesce($3, courses.name),
           level    = coalesce($4, courses.level),
           capacity = case when $5 then $6 else courses.capacity end
      from decided, request
     where courses.id = $1
       and decided.permitted
       and (courses.code, courses.name, courses.level, courses.capacity)
           is distinct from (coalesce($2, courses.code), coalesce($3, courses.name),
                             coalesce($4, courses.level),
                             case when $5 then $6 else courses.capacity end)
    returning courses.id, courses.code, courses.name, courses.level, courses.capacity,
              courses.enrolled_count, courses.created_at,
              course_etag(courses.id, courses.code, courses.name, courses.level,
                          courses.capacity, courses.enrolled_count) as etag
)
select id, code, name, level, capacity, enrolled_count, created_at, etag, true as permitted
  from updated
 union all
select id, code, name, level, capacity, enrolled_count, created_at, etag, permitted
  from decided
 where not exists (select from updated)
