"""Evaluation: the RAG baseline, answerers, metrics and the report (built by the eval stage)."""
