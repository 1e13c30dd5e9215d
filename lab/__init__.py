"""Ferry's development lab: a real Debian 12 server under QEMU to replicate from.

A development package (``python -m lab``), never installed on hosts.  ``image``
builds and caches the disks, ``machine`` boots them from copy-on-write
overlays, ``__main__`` is the command line; ``docs/lab.md`` is the guide.
"""
