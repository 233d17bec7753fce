-- get: $1 student_id, $2 course_id
-- returns no row when the student does not exist, else one row whose enrolled_at is null
-- when the student is not enrolled in that course
select sc.enrolled_at
  from students s
  left join student_courses sc
    on sc.student_id = s.id
   and sc.course_id = $2
 where s.id = $1
