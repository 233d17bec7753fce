-- prune: $1 the most rows to delete
-- returns one row: deleted, the number of expired outcomes deleted; oldest first, skipping
-- rows another transaction holds, so that pruning never waits for (or blocks) a request
with expired as (
    select scope, key
      from idempotency_keys
     where expires_at <= now()
     order by expires_at
     limit $1
       for update skip locked
), deleted as (
    delete from idempotency_keys k
     using expired
     where k.scope = expired.scope
       and k.key = expired.key
    returning 1
)
select count(*) as deleted
  from deleted
