-- get: $1 course_id
-- returns the course, then its etag; or no row
select id, code, name, level, capacity, enrolled_count, created_at,
       course_etag(id, code, name, level, capacity, enrolled_count) as etag
  from courses
 where id = $1
