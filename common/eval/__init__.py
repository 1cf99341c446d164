"""Phase 3: closed-loop LIBERO evaluation, its summaries and the naive / robust comparison."""
