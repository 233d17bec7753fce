drop function if exists course_etag(bigint, text, text, text, integer, integer);
drop function if exists student_etag(bigint, text, text);
