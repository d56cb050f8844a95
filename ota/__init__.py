"""Signed over-the-air updates (TUF) and slot management."""
