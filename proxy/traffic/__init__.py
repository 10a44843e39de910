"""Traffic decisions as sans-IO cores: balancing, retries, breakers, outliers.

Nothing here touches a socket, a clock or a global random source: callers pass
`now` (monotonic seconds) and `rng` (a `random.Random`), so tests drive them
with fake clocks and seeded randomness.
"""
