"""What every layer may use: the project's exceptions, crash-safe file writes, and the host
memory setting of CPU processes."""
