-- find: $1 scope, $2 key
-- returns the live stored outcome under that key, or no row
select fingerprint, status, content_type, location, etag, body
  from idempotency_keys
 where scope = $1
   and key = $2
   and expires_at > now()
