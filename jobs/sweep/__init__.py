"""``salgl tune``: the sweep driver (``tune``), its search space (``search_space``) and what it
prints while it runs (``progress``)."""
