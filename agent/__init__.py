"""Ferry's mobility agent: tracks changed blocks and ships them to a process server."""
