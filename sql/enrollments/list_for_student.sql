-- list_for_student: $1 student_id, $2 after course_id (0 for the first page),
--                   $3 rows to fetch (the page size plus one)
-- returns no row when the student does not exist; one row of nulls when the page is empty;
-- else the student's courses in course id order, each with its enrolled_at
select c.id, c.code, c.name, c.level, c.capacity, c.enrolled_count, c.created_at,
       page.enrolled_at
  from students s
  left join lateral (
        select sc.course_id, sc.enrolled_at
          from student_courses sc
         where sc.student_id = s.id
           and sc.course_id > $2
         order by sc.course_id
         limit $3
       ) page on true
  left join courses c on c.id = page.course_id
 where s.id = $1
 order by page.course_id
