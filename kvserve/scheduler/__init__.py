"""Scheduling: which requests run each step and how many tokens each feeds (no torch)."""
