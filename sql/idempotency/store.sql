-- store: $1 scope, $2 key, $3 fingerprint, $4 status, $5 content_type, $6 location or null,
--        $7 etag or null, $8 body, $9 seconds to keep it
-- returns one row when the outcome is stored (the key was new, or its outcome had expired);
-- no row when a live outcome holds the key. Run in the request's own transaction, after its
-- change: a concurrent request holding the same key makes this wait until it commits.
insert into idempotency_keys as k
       (scope, key, fingerprint, status, content_type, location, etag, body, expires_at)
values ($1, $2, $3, $4, $5, $6, $7, $8, now() + make_interval(secs => $9))
    on conflict (scope, key) do update
   set fingerprint  = excluded.fingerprint,
       status       = excluded.status,
       content_type = excluded.content_type,
       location     = excluded.location,
       etag         = excluded.etag,
       body         = excluded.body,
       created_at   = now(),
       expires_at   = excluded.expires_at
 where k.expires_at <= now()
returning true as stored
