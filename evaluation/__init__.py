"""Offline accuracy: retrieval evaluation of every granularity and cascade, the Mix'n'Match frontier, metrics.

    python -m evaluation.evaluate --json eval.json      # or `matsearch eval`
    python -m evaluation.frontier --model DIR           # or `matsearch budget`
"""
