"""The evaluators: registry key = module name = `conf/eval/<name>.yaml` (classification, perplexity, lm_eval)."""
