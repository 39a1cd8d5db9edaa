"""Small shared helpers that every layer may use (no torch)."""
