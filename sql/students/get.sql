-- get: $1 student_id
-- returns the student, or no row
select id, name, email, created_at
  from students
 where id = $1
