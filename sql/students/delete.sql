-- delete: $1 student_id
-- returns the deleted id, or no row; enrollments go with it (on delete cascade)
delete from students
 where id = $1
returning id
