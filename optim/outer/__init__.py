"""Outer optimizers over workers: CO2 (asynchronous, one-round-stale outer average with staleness
penalty and momentum clipping), local SGD and DiLoCo (synchronous), and a one-process simulator of
G workers that tests compare them against (docs/co2.md)."""
