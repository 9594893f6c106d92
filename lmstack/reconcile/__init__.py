"""Reconciling: observe, plan (pure), apply."""
