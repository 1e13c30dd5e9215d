"""The development kit: the embedded deployment, the demo and the Azurite launcher.

Never installed on hosts; used by `make demo-direct`, the tests and the benchmarks.
"""
