-- list: $1 after_id (0 for the first page), $2 rows to fetch (the page size plus one)
-- returns courses in id order
select id, code, name, level, capacity, enrolled_count, created_at
  from courses
 where id > $1
 order by id
 limit $2
