-- page_about: $1 the position the page starts after (null: from the oldest retained change),
--             $2 how many changes at most, $3 student_id or null, $4 course_id or null (at
--             least one of the two is set)
-- page.sql for the changes about one student, one course, or both (an enrollment's changes
-- are about its student and its course): found through the id indexes, then ordered, so a
-- student's or course's history costs what its own length does. Returns what page.sql does.
with state as materialized (
    select * from change_feed_page_state($1)
), about as (
    select txid, ordinal
      from changes
     where student_id = $3
       and ($4::bigint is null or course_id = $4)
     union all
    select txid, ordinal
      from changes
     where $3::bigint is null
       and course_id = $4
)
select state.expired, state.head, state.after, page.*
  from state
  left join lateral (
      select (c.stamp << 20) | ch.ordinal as position, ch.type, ch.occurred_at,
             ch.student_id, ch.course_id, ch.request_id, ch.data::text as data
        from about a
        join change_commits c
          on c.txid = a.txid
        join changes ch
          on ch.txid = a.txid
         and ch.ordinal = a.ordinal
       where not state.expired
         and c.stamp < state.below
         and (c.stamp << 20) | ch.ordinal > state.after
       order by c.stamp, ch.ordinal
       limit $2
  ) page on true
