"""What the eval stage needs beyond eval/: which model each arm's generator is, and the
upstream records turned into the report's provenance (stages, lineage, leakage)."""
