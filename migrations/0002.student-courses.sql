-- student_courses: the many-to-many enrollment between students and courses.
-- Correct on a database where an older deployment already created student_courses and filled
-- it (hence `if not exists`), and harmless when run again (yoyo marks a migration applied in a
-- separate transaction): enrolled_count is recomputed from the rows, never assumed to be 0.
-- depends: 0001.students-and-courses

create table if not exists student_courses (
    student_id   bigint      not null,
    course_id    bigint      not null,
    enrolled_at  timestamptz not null default now(),
    constraint student_courses_pkey primary key (student_id, course_id),
    constraint student_courses_student_id_fkey foreign key (student_id)
        references students (id) on delete cascade,
    constraint student_courses_course_id_fkey foreign key (course_id)
        references courses (id) on delete cascade
);

-- No enrollment may change between the backfill below and the triggers taking over: share
-- row exclusive lets reads go on and makes writers wait until this migration commits.
lock table student_courses in share row exclusive mode;

-- The roster (GET /courses/{id}/students) walks a course's students in id order.
create index if not exists student_courses_course_id_student_id_idx
    on student_courses (course_id, student_id);

-- enrolled_count is kept true by the triggers below, whatever deletes the rows (an unenroll,
-- or a cascade from a deleted student or course), and the check refuses any write that would
-- put more students in a course than it has seats.
alter table courses add column if not exists enrolled_count integer not null default 0;

-- The true counts, from the rows already there; only courses whose count is wrong are written.
update courses
   set enrolled_count = coalesce(counted.enrolled, 0)
  from courses as listed
  left join (select course_id, count(*)::integer as enrolled
               from student_courses
              group by course_id) as counted
         on counted.course_id = listed.id
 where courses.id = listed.id
   and courses.enrolled_count <> coalesce(counted.enrolled, 0);

-- Added `not valid`, so adding them does not scan courses under this transaction's exclusive
-- lock; they hold for every write from now on, and 0003 validates the existing rows under a
-- lock that lets reads and writes go on. Added only when missing: a re-run keeps validated
-- constraints validated.
do $$
begin
    if not exists (select from pg_constraint
                    where conrelid = 'courses'::regclass
                      and conname = 'courses_enrolled_within_capacity') then
        alter table courses add constraint courses_enrolled_within_capacity
            check (capacity is null or enrolled_count <= capacity) not valid;
    end if;
    if not exists (select from pg_constraint
                    where conrelid = 'courses'::regclass
                      and conname = 'courses_enrolled_count_nonnegative') then
        alter table courses add constraint courses_enrolled_count_nonnegative
            check (enrolled_count >= 0) not valid;
    end if;
end;
$$;

create or replace function student_courses_count_insert() returns trigger
language plpgsql as $$
begin
    update courses set enrolled_count = enrolled_count + 1 where id = new.course_id;
    return null;
end;
$$;

create or replace function student_courses_count_delete() returns trigger
language plpgsql as $$
begin
    update courses set enrolled_count = enrolled_count - 1 where id = old.course_id;
    return null;
end;
$$;

-- Row triggers fire in name order, after PostgreSQL's own foreign-key checks ("RI_…" sorts
-- first), so a missing student or course is reported before a full course.
drop trigger if exists student_courses_count_insert on student_courses;
create trigger student_courses_count_insert
    after insert on student_courses
    for each row execute function student_courses_count_insert();

drop trigger if exists student_courses_count_delete on student_courses;
create trigger student_courses_count_delete
    after delete on student_courses
    for each row execute function student_courses_count_delete();
