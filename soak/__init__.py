"""The nemesis soak: a 5-node filch cluster in network namespaces, a seeded mixed workload,
random overlapping faults from a seeded schedule, and a check of the whole history
against filch's invariants afterwards. `python -m soak.run --seed N --minutes M`."""
