"""Planning and streaming execution of merges: the only layer that joins ``io`` and ``methods``."""
