-- list_for_student: $1 student_id, $2 after course_id (0 for the first page),
--                   $3 rows to fetch (the page size plus one: the extra one says a next page exists)
-- returns no row when the student does not exist; else one row:
--   items    the page's courses in course id order, each with its enrolled_at, as a JSON array
--            (UTF-8) written as the service's encoder writes EnrolledCourse: the response's
--            bytes, with no decoding and encoding again in the service
--   last_id  the last course id on the page (null when the page is empty)
--   more     whether a next page exists
select convert_to('[' || coalesce(string_agg(
           '{"id":' || c.id
           || ',"code":' || to_json(c.code)::text
           || ',"name":' || to_json(c.name)::text
           || ',"level":' || to_json(c.level)::text
           || ',"capacity":' || coalesce(c.capacity::text, 'null')
           || ',"enrolled_count":' || c.enrolled_count
           || ',"created_at":' || json_timestamp(c.created_at)
           || ',"enrolled_at":' || json_timestamp(page.enrolled_at)
           || '}',
           ',' order by page.course_id) filter (where page.n < $3), '') || ']', 'UTF8') as items,
       max(page.course_id) filter (where page.n < $3) as last_id,
       count(page.course_id) = $3 as more
  from students s
  left join lateral (
        select sc.course_id, sc.enrolled_at, row_number() over (order by sc.course_id) as n
          from student_courses sc
         where sc.student_id = s.id
           and sc.course_id > $2
         order by sc.course_id
         limit $3
       ) page on true
  left join courses c on c.id = page.course_id
 where s.id = $1
 group by s.id
