-- ping: no parameters
-- returns 1 when the database answers
select 1
