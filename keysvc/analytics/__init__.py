"""Analytics: every verification and rate-limit decision, spooled locally by the workers and
written to ClickHouse in batches by the node's flusher.

    request path  ->  events.py (the rows)  ->  spool.py (LMDB, no network)
    flusher.py (one process per node)  ->  ClickHouse (chDB embedded, or a server by URL)
"""
