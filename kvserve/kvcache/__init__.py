"""KV bookkeeping without torch: which blocks exist, who holds them, which prefixes they cache.

The K/V bytes themselves live in kvserve.kvstore; this package only decides and records.
"""
