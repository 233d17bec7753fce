-- create: $1 code, $2 name, $3 level, $4 capacity or null
-- returns the new course, then its etag; a duplicate code raises unique_violation on
-- courses_code_key
insert into courses (code, name, level, capacity)
values ($1, $2, $3, $4)
returning id, code, name, level, capacity, enrolled_count, created_at,
          course_etag(id, code, name, level, capacity, enrolled_count) as etag
