-- Validates the constraints 0002 added `not valid`: this scans courses under share update
-- exclusive, which lets reads and writes go on (unlike the access exclusive lock of adding a
-- validated constraint), so a big courses table is checked without stopping the service.
-- Fails, naming the constraint, if an existing row breaks it; a no-op where 0002's constraints
-- are valid already.
-- depends: 0002.student-courses

alter table courses validate constraint courses_enrolled_within_capacity;

alter table courses validate constraint courses_enrolled_count_nonnegative;
