-- create: $1 code, $2 name, $3 level, $4 capacity or null, $5 request id (for the change feed;
--         passed by the service)
-- returns the new course, then its etag; a duplicate code raises unique_violation on
-- courses_code_key
with request as (
    select set_config('enrollment.request_id', $5, true)
)
insert into courses (code, name, level, capacity)
select $1, $2, $3, $4
  from request
returning id, code, name, level, capacity, enrolled_count, created_at,
          course_etag(id, code, name, level, capacity, enrolled_count) as etag
