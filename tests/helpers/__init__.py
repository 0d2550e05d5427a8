"""Test helpers: tiny models and data, gloo process groups, host-sync counting, self-signalling callbacks."""
