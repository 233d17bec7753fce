-- batch: $1 student_ids, $2 course_ids, $3 drops (true: drop, false: enroll), $4 atomic,
--        $5 request id (for the change feed; passed by the service);
-- one entry per item, in item order (see migrations/0005.enrollment-batch.sql)
-- returns one row per item, in item order: item (0-based), outcome ('created' | 'unchanged' |
-- 'dropped' | 'student-not-found' | 'course-not-found' | 'enrollment-not-found' |
-- 'course-full'), enrolled_at (for 'created' and 'unchanged'). Atomic and any item fails:
-- nothing is written.
select item, outcome, enrolled_at
  from enrollment_batch($1::bigint[], $2::bigint[], $3::boolean[], $4::boolean,
                       request_id => $5::text)
 order by item
