-- list_by_email: $1 email (matched case-insensitively), $2 after_id, $3 rows to fetch
-- returns at most one student (emails are unique); uses students_email_key
select id, name, email, created_at
  from students
 where lower(email) = lower($1)
   and id > $2
 order by id
 limit $3
