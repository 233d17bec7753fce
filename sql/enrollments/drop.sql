-- drop: $1 student_id, $2 course_id
-- returns one row: student_exists, dropped
with dropped as (
    delete from student_courses
     where student_id = $1
       and course_id = $2
    returning 1
)
select exists (select from students where id = $1) as student_exists,
       exists (select from dropped)                 as dropped
