"""Benchmarks, one module per bench with a ``main(argv)``; ``boothkit bench NAME`` (commands/bench.py) runs them.
Every bench prints a readable table, then as its last line one JSON object with its figures (ratios against a
baseline measured in the same run). Tests may import bench, never the reverse."""
