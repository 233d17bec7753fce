-- delete: $1 course_id
-- returns the deleted id, or no row; enrollments go with it (on delete cascade)
delete from courses
 where id = $1
returning id
