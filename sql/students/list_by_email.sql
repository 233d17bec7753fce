-- list_by_email: $1 after_id, $2 rows to fetch, $3 email (matched case-insensitively)
-- returns at most one student (emails are unique); uses students_email_key
select id, name, email, created_at
  from students
 where lower(email) = lower($3)
   and id > $1
 order by id
 limit $2
