-- prune: $1 seconds of history to keep, $2 how many transactions' changes at most
-- Deletes the changes of the oldest transactions, in stamp order, up to the first one younger
-- than $1 seconds (at most $2 of them), and moves pruned_through past them, so that a cursor
-- from before them answers 410 and a reader starting from the oldest retained change misses
-- none. Returns `deleted`, the number of transactions removed: fewer than $2 means done for now.
with oldest as (
    select c.txid, c.stamp, c.committed_at
      from change_commits c
     order by c.stamp
     limit $2
), doomed as (
    select o.txid, o.stamp
      from oldest o
     where o.stamp < coalesce((select min(y.stamp)
                                 from oldest y
                                where y.committed_at >= now() - make_interval(secs => $1)),
                              9223372036854775807)
), gone as (
    delete from changes ch
     using doomed d
     where ch.txid = d.txid
    returning (d.stamp << 20) | ch.ordinal as position
), commits as (
    delete from change_commits c
     using doomed d
     where c.txid = d.txid
    returning c.txid
), marked as (
    update change_feed_state
       set pruned_through = greatest(pruned_through, (select max(position) from gone))
     where exists (select from gone)
)
select count(*)::integer as deleted
  from commits
