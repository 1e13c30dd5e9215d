"""Test harnesses shared by test modules (never a test module others import)."""
