"""The rows of tools/benchmark.py, one module per row group (common.py: what they share); the runner is
tools/benchmark.py, which puts tools/ on sys.path and imports this package."""
