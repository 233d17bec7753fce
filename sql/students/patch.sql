-- patch: $1 student_id, $2 name or null (keep), $3 email or null (keep)
-- returns the updated student, or no row when it does not exist;
-- a duplicate email raises unique_violation on students_email_key
update students
   set name  = coalesce($2, name),
       email = coalesce($3, email)
 where id = $1
returning id, name, email, created_at
