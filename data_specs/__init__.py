"""The typed run spec and the shipped YAML specs (`python_docs.yaml`, `tiny.yaml`)."""
