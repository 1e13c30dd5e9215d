"""Test harnesses shared by test modules (pytest plugins and helpers)."""
