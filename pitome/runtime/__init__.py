"""The merge runtime every adapter shares: per-forward state and sessions, the merge point
for blocks a model's own forward loops over, and the patcher that records every change."""
