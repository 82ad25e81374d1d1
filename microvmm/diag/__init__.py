"""Diagnostics: where a guest is and why it stopped (symbols, decoded instructions)."""
