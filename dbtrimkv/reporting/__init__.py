"""What the engine tells the user: statistics text, retention maps and timelines, output paths."""
