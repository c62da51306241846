"""Command-line tools that drive whole runs (soak tests, ...), not imported by training."""
