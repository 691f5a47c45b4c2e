"""Optional parts beside the tutorial: the root imports them only inside the branch of a flag that asks."""
