"""gristmill stages (one module each) and the shared machinery they run on."""
