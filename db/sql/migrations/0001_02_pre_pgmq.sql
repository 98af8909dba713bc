-- 0001_02 (pre): pgmq, from the SQL bundled with the pinned `pgmq` Python package
-- (no server extension needed), and the queue the order router drains.
SET LOCAL ROLE mmats_owner;

-- mmats:include-pgmq

SELECT pgmq.create('orders');
