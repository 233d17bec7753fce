-- get: $1 course_id
-- returns the course, or no row
select id, code, name, level, capacity, enrolled_count, created_at
  from courses
 where id = $1
