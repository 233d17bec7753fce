-- patch: $1 course_id, $2 code, $3 name, $4 level (each null to keep),
--        $5 whether capacity is being set, $6 the new capacity (null removes the limit)
-- returns the updated course, or no row when it does not exist;
-- a duplicate code raises unique_violation on courses_code_key, and a capacity below
-- enrolled_count raises check_violation on courses_enrolled_within_capacity
update courses
   set code     = coalesce($2, code),
       name     = coalesce($3, name),
       level    = coalesce($4, level),
       capacity = case when $5 then $6 else capacity end
 where id = $1
returning id, code, name, level, capacity, enrolled_count, created_at
