"""The training loop, its optimizer and schedule, and checkpoint files."""
