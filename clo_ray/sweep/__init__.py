"""The sweep: every stage in order over storage, resumable."""
