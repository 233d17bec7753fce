-- idempotency_keys: the stored outcome of each request sent with an Idempotency-Key, written
-- in the same transaction as the change the request made, so that an outcome exists if and
-- only if its change committed. Expired rows are deleted by the service (sql/idempotency/prune).
-- depends: 0003.validate-course-constraints

create table if not exists idempotency_keys (
    scope         text        not null,  -- the caller: a token's name, or '-' without tokens
    key           text        not null,
    fingerprint   bytea       not null,  -- SHA-256 of the method, the path and the JSON body
    status        smallint    not null,
    content_type  text        not null,
    location      text,
    etag          text,
    body          bytea       not null,
    created_at    timestamptz not null default now(),
    expires_at    timestamptz not null,
    constraint idempotency_keys_pkey primary key (scope, key),
    constraint idempotency_keys_key_length check (octet_length(key) between 1 and 255)
);

-- The pruning walks the oldest first.
create index if not exists idempotency_keys_expires_at_idx on idempotency_keys (expires_at);
