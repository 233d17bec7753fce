-- roster: $1 course_id, $2 after student_id (0 for the first page),
--         $3 rows to fetch (the page size plus one: the extra one says a next page exists)
-- returns no row when the course does not exist; else one row:
--   items    the page's students in student id order, each with its enrolled_at, as a JSON
--            array (UTF-8) written as the service's encoder writes EnrolledStudent: the
--            response's bytes, with no decoding and encoding again in the service
--   last_id  the last student id on the page (null when the page is empty)
--   more     whether a next page exists
select convert_to('[' || coalesce(string_agg(
           '{"id":' || s.id
           || ',"name":' || to_json(s.name)::text
           || ',"email":' || to_json(s.email)::text
           || ',"created_at":' || json_timestamp(s.created_at)
           || ',"enrolled_at":' || json_timestamp(page.enrolled_at)
           || '}',
           ',' order by page.student_id) filter (where page.n < $3), '') || ']', 'UTF8') as items,
       max(page.student_id) filter (where page.n < $3) as last_id,
       count(page.student_id) = $3 as more
  from courses c
  left join lateral (
        select sc.student_id, sc.enrolled_at, row_number() over (order by sc.student_id) as n
          from student_courses sc
         where sc.course_id = c.id
           and sc.student_id > $2
         order by sc.student_id
         limit $3
       ) page on true
  left join students s on s.id = page.student_id
 where c.id = $1
 group by c.id
