"""The pure core: schedules, partitions, the simulator, step reports, decisions, analysis.

Plain data and functions, printable and testable without processes. Nothing here imports
torch (tests/test_layout.py enforces it), so controllers and the simulator run anywhere.
"""
