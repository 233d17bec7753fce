drop table if exists courses;
drop table if exists students;
