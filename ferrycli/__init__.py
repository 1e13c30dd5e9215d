"""``ferry``: the operator's command line (a face of its own; hosts need not install it)."""
