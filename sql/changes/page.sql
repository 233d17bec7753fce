-- page: $1 the position the page starts after (null: from the oldest retained change),
--       $2 how many changes at most
-- The changes after $1, oldest first, among those whose stamp is below the horizon (the oldest
-- transaction still running, see migrations/0008.change-feed.sql): no change committing later
-- can come before one returned here. One row per change: position, type, occurred_at,
-- student_id, course_id, request_id, data (JSON text), each also carrying `expired` (changes
-- after $1 were pruned: nothing else is returned), `head` (the position after every change
-- below the horizon) and `after` (where the page starts: $1, or where pruning stopped); with no
-- change, a single row carrying only those three.
-- The page is a lateral subquery so that the state's values bound the scan of the stamp index
-- (a join with the state would only filter a scan from the feed's very start).
with state as materialized (
    select * from change_feed_page_state($1)
)
select state.expired, state.head, state.after, page.*
  from state
  left join lateral (
      select (c.stamp << 20) | ch.ordinal as position, ch.type, ch.occurred_at,
             ch.student_id, ch.course_id, ch.request_id, ch.data::text as data
        from change_commits c
        join changes ch
          on ch.txid = c.txid
       where not state.expired
         and c.stamp >= state.after >> 20
         and c.stamp < state.below
         and (c.stamp << 20) | ch.ordinal > state.after
       order by c.stamp, ch.ordinal
       limit $2
  ) page on true
