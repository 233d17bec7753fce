-- roster: $1 course_id, $2 after student_id (0 for the first page),
--         $3 rows to fetch (the page size plus one)
-- returns no row when the course does not exist; one row of nulls when the page is empty;
-- else the course's students in student id order, each with its enrolled_at
select s.id, s.name, s.email, s.created_at,
       page.enrolled_at
  from courses c
  left join lateral (
        select sc.student_id, sc.enrolled_at
          from student_courses sc
         where sc.course_id = c.id
           and sc.student_id > $2
         order by sc.student_id
         limit $3
       ) page on true
  left join students s on s.id = page.student_id
 where c.id = $1
 order by page.student_id
