drop table if exists student_courses;
drop function if exists student_courses_count_insert();
drop function if exists student_courses_count_delete();
alter table courses drop constraint if exists courses_enrolled_within_capacity;
alter table courses drop constraint if exists courses_enrolled_count_nonnegative;
alter table courses drop column if exists enrolled_count;
