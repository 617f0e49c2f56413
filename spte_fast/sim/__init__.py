"""The simulator behind ``spte-fast simulate``: fault sources and trace files."""
