-- The change feed (GET /changes): every committed change to students, courses and enrollments,
-- recorded by triggers in the transaction that makes it, and read in commit order.
-- depends: 0007.enrollment-json
--
-- Ordering. A writing transaction records its changes in `changes` under its own transaction
-- id (`txid`) and an ordinal (0, 1, 2, ... in the order they happened). When it commits, a
-- deferred trigger gives it a *stamp*: the id of a subtransaction begun right then, so a fresh
-- transaction id, newer than that of every transaction that committed before it got there. Two
-- traps are avoided:
--   - a number taken when the change is written (a sequence, the writer's own transaction id)
--     orders by start, not commit: an enroll that waited for a concurrent drop of the same pair
--     would come before that drop;
--   - a number taken at commit, read as soon as it is visible, lets a reader pass a transaction
--     that took a smaller one but commits later.
-- Readers therefore return only stamps below the oldest transaction still running
-- (pg_snapshot_xmin): a stamp below it belongs to a transaction that has ended, and every
-- transaction yet to commit has a transaction id, and so a stamp, at or above it. A change's
-- `position` is stamp * 2^20 + ordinal: it strictly increases along the feed. Nothing is
-- serialized: writers take no common lock.

-- next_change_ordinal: 0, 1, 2, ... within the calling transaction, counted in a
-- transaction-local setting, which a rolled-back subtransaction rolls back with the entries it
-- recorded. (Plain SQL, so PostgreSQL inlines it into the insert that uses it.)
create or replace function next_change_ordinal() returns integer
language sql volatile
as $$
    select set_config(
        'enrollment.change_ordinal',
        (coalesce(nullif(current_setting('enrollment.change_ordinal', true), '')::integer, -1)
         + 1)::text,
        true)::integer
$$;

-- The defaults do the bookkeeping, so a trigger records a change with one insert of what it
-- knows. The request id is the one the statement set: every statement of the service that
-- writes sets it; anything else records null.
create table if not exists changes (
    txid        xid8        not null default pg_current_xact_id(),
    ordinal     integer     not null default next_change_ordinal(),
    type        text        not null,
    student_id  bigint,
    course_id   bigint,
    occurred_at timestamptz not null default now(),
    request_id  text        default nullif(current_setting('enrollment.request_id', true), ''),
    data        json,
    constraint changes_pkey primary key (txid, ordinal),
    constraint changes_ordinal_range check (ordinal between 0 and 1048575)
);

-- A student's or a course's history (GET /changes?student_id= / ?course_id=).
create index if not exists changes_student_id_idx on changes (student_id)
    where student_id is not null;
create index if not exists changes_course_id_idx on changes (course_id)
    where course_id is not null;

-- One row per committed writing transaction: its stamp, and when it committed (for retention).
create table if not exists change_commits (
    txid         xid8        not null,
    stamp        bigint,
    committed_at timestamptz not null,
    constraint change_commits_pkey primary key (txid),
    constraint change_commits_stamp_key unique (stamp)
);

-- How far retention has pruned: a cursor before this position has lost changes (410).
create table if not exists change_feed_state (
    singleton      boolean primary key default true check (singleton),
    pruned_through bigint  not null default 0
);
insert into change_feed_state (singleton) values (true) on conflict do nothing;

-- stamp_change_commit: at commit (deferred), once per transaction that recorded changes.
create or replace function stamp_change_commit() returns trigger
language plpgsql
as $$
declare
    top      bigint := pg_current_xact_id()::text::bigint;
    sub      bigint;
    stamped  bigint;
    inserted tid;
begin
    -- The exception clause makes the block a subtransaction; its first write gives it a
    -- transaction id of its own, which the inserted row carries as xmin.
    begin
        insert into change_commits (txid, committed_at)
        values (top::text::xid8, clock_timestamp())
        returning ctid, xmin::text::bigint into inserted, sub;
    exception when others then
        raise;
    end;
    -- xmin is the low 32 bits; the epoch is the writer's, or the next one if it wrapped since.
    stamped := (top >> 32 << 32) | sub;
    if stamped < top then
        stamped := stamped + 4294967296;
    end if;
    -- By ctid: a plan cached while the table was small could otherwise scan it all.
    update change_commits set stamp = stamped where ctid = inserted;
    return null;
end;
$$;

drop trigger if exists changes_stamp_at_commit on changes;
create constraint trigger changes_stamp_at_commit
    after insert on changes
    deferrable initially deferred
    for each row
    when (new.ordinal = 0)
    execute function stamp_change_commit();

-- What each table records. A cascade's deletions are recorded by the parent's before-delete
-- trigger, which locks the enrollments it is about to lose (so a concurrent drop either
-- finished before, and is not counted twice, or waits until after), in id order: PostgreSQL
-- runs a cascade's own triggers only after the parent's, which would put the student.deleted
-- first. The enrollment's own delete trigger then records only a drop whose student and course
-- both still exist.
create or replace function record_student_change() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'DELETE' and tg_when = 'BEFORE' then
        insert into changes (type, student_id, course_id)
        select 'enrollment.deleted', old.id, doomed.course_id
          from (select sc.course_id from student_courses sc
                 where sc.student_id = old.id
                 order by sc.course_id
                   for update) doomed;
        return old;
    elsif tg_op = 'DELETE' then
        insert into changes (type, student_id) values ('student.deleted', old.id);
    else
        insert into changes (type, student_id, data)
        values (case tg_op when 'INSERT' then 'student.created' else 'student.updated' end,
                new.id,
                json_build_object('id', new.id, 'name', new.name, 'email', new.email,
                                  'created_at', new.created_at));
    end if;
    return null;
end;
$$;

create or replace function record_course_change() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'DELETE' and tg_when = 'BEFORE' then
        insert into changes (type, student_id, course_id)
        select 'enrollment.deleted', doomed.student_id, old.id
          from (select sc.student_id from student_courses sc
                 where sc.course_id = old.id
                 order by sc.student_id
                   for update) doomed;
        return old;
    elsif tg_op = 'DELETE' then
        insert into changes (type, course_id) values ('course.deleted', old.id);
    else
        insert into changes (type, course_id, data)
        values (case tg_op when 'INSERT' then 'course.created' else 'course.updated' end,
                new.id,
                json_build_object('id', new.id, 'code', new.code, 'name', new.name,
                                  'level', new.level, 'capacity', new.capacity,
                                  'enrolled_count', new.enrolled_count,
                                  'created_at', new.created_at));
    end if;
    return null;
end;
$$;

create or replace function record_enrollment_change() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'INSERT' then
        insert into changes (type, student_id, course_id, data)
        values ('enrollment.created', new.student_id, new.course_id,
                json_build_object('student_id', new.student_id, 'course_id', new.course_id,
                                  'enrolled_at', new.enrolled_at));
    elsif exists (select from students where id = old.student_id)
          and exists (select from courses where id = old.course_id) then
        insert into changes (type, student_id, course_id)
        values ('enrollment.deleted', old.student_id, old.course_id);
    end if;
    return null;
end;
$$;

drop trigger if exists students_record_cascade on students;
create trigger students_record_cascade
    before delete on students
    for each row execute function record_student_change();
drop trigger if exists students_record_change on students;
create trigger students_record_change
    after insert or delete on students
    for each row execute function record_student_change();
drop trigger if exists students_record_update on students;
create trigger students_record_update
    after update of name, email on students
    for each row
    when ((old.name, old.email) is distinct from (new.name, new.email))
    execute function record_student_change();

-- `update of` the columns a PATCH sets: the seat count's updates record nothing.
drop trigger if exists courses_record_cascade on courses;
create trigger courses_record_cascade
    before delete on courses
    for each row execute function record_course_change();
drop trigger if exists courses_record_change on courses;
create trigger courses_record_change
    after insert or delete on courses
    for each row execute function record_course_change();
drop trigger if exists courses_record_update on courses;
create trigger courses_record_update
    after update of code, name, level, capacity on courses
    for each row
    when ((old.code, old.name, old.level, old.capacity)
          is distinct from (new.code, new.name, new.level, new.capacity))
    execute function record_course_change();

-- Insert and delete only: enroll's `on conflict do update` of an existing pair changes nothing.
drop trigger if exists student_courses_record_change on student_courses;
create trigger student_courses_record_change
    after insert or delete on student_courses
    for each row execute function record_enrollment_change();

-- POST /enrollments/batch with the request id its changes record: 0005's function, run after
-- setting it (a statement cannot be trusted to evaluate a set_config before a function scan).
create or replace function enrollment_batch(
    student_ids bigint[], course_ids bigint[], drops boolean[], atomic boolean, request_id text
) returns table (item integer, outcome text, enrolled_at timestamptz)
language plpgsql
as $$
begin
    perform set_config('enrollment.request_id', request_id, true);
    return query select * from enrollment_batch(student_ids, course_ids, drops, atomic);
end;
$$;

-- change_feed_head: the position after every change below `horizon` (the caller's
-- pg_snapshot_xmin), or where pruning stopped when none is left: the cursor that is "now".
create or replace function change_feed_head(horizon bigint) returns bigint
language sql stable parallel safe
as $$
    select coalesce(
        (select (c.stamp << 20) | (select max(ch.ordinal) from changes ch where ch.txid = c.txid)
           from change_commits c
          where c.stamp < horizon
          order by c.stamp desc
          limit 1),
        (select pruned_through from change_feed_state))
$$;

-- change_feed_page_state: what a page read after `cursor_position` (null: from the oldest
-- retained change) needs besides the changes: whether changes after it were pruned
-- (`expired`), the head, where the page starts (`after`, or where pruning stopped), and the
-- horizon (`below`: the oldest transaction still running; only stamps below it are read).
-- Called once per page read, in the reading statement, so all of it shares that snapshot.
create or replace function change_feed_page_state(cursor_position bigint)
returns table (expired boolean, head bigint, after bigint, below bigint)
language sql stable parallel safe
as $$
    select coalesce(s.pruned_through > cursor_position, false),
           change_feed_head(h.below),
           coalesce(cursor_position, s.pruned_through),
           h.below
      from (select pg_snapshot_xmin(pg_current_snapshot())::text::bigint as below) h,
           change_feed_state s
$$;
