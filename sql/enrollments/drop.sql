-- drop: $1 student_id, $2 course_id, $3 request id (for the change feed; passed by the service)
-- returns one row: student_exists, dropped
with request as (
    select set_config('enrollment.request_id', $3, true)
), dropped as (
    delete from student_courses
     using request
     where student_id = $1
       and course_id = $2
    returning 1
)
select exists (select from students where id = $1) as student_exists,
       exists (select from dropped)                 as dropped
