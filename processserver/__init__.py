"""Ferry's process server: receives change batches over mutual TLS, spools them
durably, packs them into segments, uploads them to Blob Storage and announces
them on each disk's queue (see docs/design.md, "Process server")."""
