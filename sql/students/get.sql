-- get: $1 student_id
-- returns the student, then its etag; or no row
select id, name, email, created_at, student_etag(id, name, email) as etag
  from students
 where id = $1
