"""Runnable studies; each writes JSON (and PNG where it plots) under results/."""
