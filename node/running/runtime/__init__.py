"""Executors: the only places that start task processes."""
