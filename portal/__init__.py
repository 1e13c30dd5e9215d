"""Ferry's multi-tenant portal: operators watch and drive migrations from a web page.

``python -m portal --server URL`` serves it; it talks to the configuration
server only through its public HTTP API (docs/api.md).  See portal/app.py.
"""
