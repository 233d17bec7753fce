-- enrollment_batch: POST /enrollments/batch in one statement, so that the batch is one round
-- trip, one transaction, and (being one statement) retried whole on deadlock like any other.
-- depends: 0003.validate-course-constraints

-- $1 student_ids, $2 course_ids, $3 drops (true: drop, false: enroll), $4 atomic: one entry per
-- item, in item order. Returns one row per item, in item order: item (0-based), outcome
-- ('created' | 'unchanged' | 'dropped' | 'student-not-found' | 'course-not-found' |
-- 'enrollment-not-found' | 'course-full'), enrolled_at (for 'created' and 'unchanged').
--
-- Each item is what PUT (enroll) or DELETE (drop) of /students/{s}/courses/{c} would answer at
-- that point of the batch. Atomic and any item fails: the outcomes are returned and nothing is
-- written. Otherwise the items that succeed are written in item order, one row at a time, so
-- the count triggers (and any other trigger on student_courses) see them as they happened.
--
-- Why this is exact: the involved students (key share, so none is deleted under us) and then
-- courses (no key update, which is what the count trigger's update takes anyway) are locked in
-- id order before anything is read. Every write to a course's enrollments must update that
-- course's row (the count trigger) before it commits, so once the locks are held no
-- enrollment, seat count, student or course the batch reads can change until it commits: the
-- outcomes are computed in memory from one read of that state. Batches lock in the same order,
-- so they never deadlock each other. Students before courses: a student delete locks its
-- student and then, through the cascade, its courses. No exception blocks: each would be a
-- subtransaction, and more than 64 of them in one transaction slow every other session.
create or replace function enrollment_batch(
    student_ids bigint[], course_ids bigint[], drops boolean[], atomic boolean
) returns table (item integer, outcome text, enrolled_at timestamptz)
language plpgsql
as $$
declare
    n             constant integer := cardinality(student_ids);
    -- Per item: its course's slot in `free`, its pair's slot in `pair_at`, whether its student
    -- and course exist.
    course_slot   integer[];
    pair_slot     integer[];
    student_found boolean[];
    course_found  boolean[];
    -- Per course slot: free seats (null: no limit). Per pair slot: when the pair enrolled, null
    -- while it is not enrolled.
    free          integer[];
    pair_at       timestamptz[];
    outcomes      text[] := array_fill(null::text, array[n]);
    ats           timestamptz[] := array_fill(null::timestamptz, array[n]);
    failed        boolean := false;
    i             integer;
begin
    if n is distinct from cardinality(course_ids) or n is distinct from cardinality(drops) then
        raise exception 'enrollment_batch: the item arrays differ in length'
            using errcode = 'invalid_parameter_value';
    end if;

    perform from students s where s.id = any(student_ids) order by s.id for key share;
    perform from courses c where c.id = any(course_ids) order by c.id for no key update;

    -- The state the batch starts from, read once under the locks. Slots are numbered in id
    -- order; each slot's entry comes from its first item (every item of a slot sees the same).
    with items as (
        select u.ord, u.student_id, u.course_id
          from unnest(student_ids, course_ids) with ordinality as u(student_id, course_id, ord)
    ), ranked as (
        select it.ord,
               dense_rank() over courses_in_order::integer                       as c_slot,
               row_number() over course_items = 1                               as c_first,
               dense_rank() over pairs_in_order::integer                         as p_slot,
               row_number() over pair_items = 1                                 as p_first,
               s.id is not null                                                  as s_found,
               c.id is not null                                                  as c_found,
               c.capacity - c.enrolled_count                                     as c_free,
               sc.enrolled_at                                                    as p_at
          from items it
          left join students s
            on s.id = it.student_id
          left join courses c
            on c.id = it.course_id
          left join student_courses sc
            on sc.student_id = it.student_id
           and sc.course_id = it.course_id
        window courses_in_order as (order by it.course_id),
               course_items     as (partition by it.course_id order by it.ord),
               pairs_in_order   as (order by it.student_id, it.course_id),
               pair_items       as (partition by it.student_id, it.course_id order by it.ord)
    )
    select array_agg(r.c_slot order by r.ord),
           array_agg(r.p_slot order by r.ord),
           array_agg(r.s_found order by r.ord),
           array_agg(r.c_found order by r.ord),
           array_agg(r.c_free order by r.c_slot) filter (where r.c_first),
           array_agg(r.p_at order by r.p_slot) filter (where r.p_first)
      into course_slot, pair_slot, student_found, course_found, free, pair_at
      from ranked r;

    for i in 1 .. n loop
        if not student_found[i] then
            outcomes[i] := 'student-not-found';
        elsif drops[i] then
            if pair_at[pair_slot[i]] is null then
                outcomes[i] := 'enrollment-not-found';
            else
                outcomes[i] := 'dropped';
                pair_at[pair_slot[i]] := null;
                free[course_slot[i]] := free[course_slot[i]] + 1;
            end if;
        elsif not course_found[i] then
            outcomes[i] := 'course-not-found';
        elsif pair_at[pair_slot[i]] is not null then
            outcomes[i] := 'unchanged';
            ats[i] := pair_at[pair_slot[i]];
        elsif free[course_slot[i]] <= 0 then
            outcomes[i] := 'course-full';
        else
            outcomes[i] := 'created';
            -- The column's default: the transaction's start, as the insert below will store.
            ats[i] := now();
            pair_at[pair_slot[i]] := ats[i];
            free[course_slot[i]] := free[course_slot[i]] - 1;
        end if;
        failed := failed or outcomes[i] not in ('created', 'unchanged', 'dropped');
    end loop;

    if not (atomic and failed) then
        for i in 1 .. n loop
            if outcomes[i] = 'created' then
                insert into student_courses (student_id, course_id)
                values (student_ids[i], course_ids[i]);
            elsif outcomes[i] = 'dropped' then
                delete from student_courses sc
                 where sc.student_id = student_ids[i]
                   and sc.course_id = course_ids[i];
            end if;
        end loop;
    end if;

    return query
        select (u.ord - 1)::integer, u.outcome, u.at
          from unnest(outcomes, ats) with ordinality as u(outcome, at, ord)
         order by u.ord;
end;
$$;
