"""Ferry's master target: applies each disk's segments to its target, whole groups only.

Entry point :func:`mastertarget.main.main`; the per-disk logic is
:class:`mastertarget.worker.DiskWorker`.  See docs/design.md, "Master target".
"""
