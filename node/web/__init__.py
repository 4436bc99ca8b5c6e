"""Web console: dashboard, upload-and-classify, Prometheus metrics and the model card.

Served by the node process itself (``server.start_console``), from the same context as the
scheduler: the same database sessions, the same loaded model, the same analysis code.
"""
