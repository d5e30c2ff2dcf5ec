"""``salgl submit`` and ``salgl jobs``: Ray Job Submission (``client``)."""
