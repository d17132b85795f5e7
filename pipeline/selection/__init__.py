"""Stage 2: one head on every layer (cells), cross-validation, the one scoring function, the
leaderboard and the test report."""
