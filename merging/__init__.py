"""Model merging over parameter trees: operators in `merging.methods`, the streaming executor in `merging.run`."""
