"""The configuration server's logic as plain functions: data in, data out, no HTTP."""
