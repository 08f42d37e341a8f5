"""Policies that read step reports and decide how to rebalance the pipeline."""
