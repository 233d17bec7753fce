-- head: the position after every change that can no longer be overtaken (GET /changes/head,
-- and what each process's long-poll notifier watches)
select change_feed_head(pg_snapshot_xmin(pg_current_snapshot())::text::bigint) as head
