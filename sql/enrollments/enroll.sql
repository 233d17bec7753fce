-- enroll: $1 student_id, $2 course_id, $3 request id (for the change feed; passed by the service)
-- returns one row: enrolled_at, created (false when the pair already existed).
-- Every refusal comes back from this same statement, as an error named by its constraint:
--   student_courses_student_id_fkey   -> the student does not exist
--   student_courses_course_id_fkey    -> the course does not exist
--   courses_enrolled_within_capacity  -> the course is full (raised by the count trigger)
-- "do update" rather than "do nothing": it returns the existing row even when a concurrent
-- transaction inserted it after this statement's snapshot was taken, and it does not touch
-- the seat count, so a student already enrolled in a full course is told already-enrolled.
with request as (
    select set_config('enrollment.request_id', $3, true)
)
insert into student_courses as sc (student_id, course_id)
select $1, $2
  from request
    on conflict (student_id, course_id)
    do update set enrolled_at = sc.enrolled_at
returning enrolled_at, (xmax = 0) as created
