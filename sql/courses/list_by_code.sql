-- list_by_code: $1 after_id, $2 rows to fetch, $3 code (matched case-insensitively)
-- returns at most one course (codes are unique); uses courses_code_key
select id, code, name, level, capacity, enrolled_count, created_at
  from courses
 where lower(code) = lower($3)
   and id > $1
 order by id
 limit $2
