-- list: $1 after_id (0 for the first page), $2 rows to fetch (the page size plus one)
-- returns students in id order
select id, name, email, created_at
  from students
 where id > $1
 order by id
 limit $2
