"""Stages as functions (data, train, tasks, prune, evaluate, trial), the record types and the CLI."""
