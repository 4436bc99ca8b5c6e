"""Benchmarks (issue 5): ingest, preprocessing, inference, end to end and scale, as JSON.

``python -m bench`` runs all five and merges the figures into ``bench/results.json``; see
``bench/__main__.py`` for the flags and each module's docstring for what exactly it measures.
"""
