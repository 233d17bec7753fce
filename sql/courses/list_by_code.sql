-- list_by_code: $1 code (matched case-insensitively), $2 after_id, $3 rows to fetch
-- returns at most one course (codes are unique); uses courses_code_key
select id, code, name, level, capacity, enrolled_count, created_at
  from courses
 where lower(code) = lower($1)
   and id > $2
 order by id
 limit $3
