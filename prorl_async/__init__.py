"""prorl-async."""
