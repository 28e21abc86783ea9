"""What the data-driven merges (Fisher, AdaMerging) need beyond the weights: examples of each model's task
(`examples`), per-example gradients for the diagonal Fisher (`fisher`: the reference loop and the vmap
engine; `fisher_hooks`: the closed-form hooks engine), and AdaMerging's entropy-minimisation loop."""
