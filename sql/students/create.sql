-- create: $1 name, $2 email
-- returns the new student, then its etag; a duplicate email raises unique_violation on
-- students_email_key
insert into students (name, email)
values ($1, $2)
returning id, name, email, created_at, student_etag(id, name, email) as etag
