"""Pure-torch sparse GPT: config, modules, hook points, sparsity mechanics, node addressing."""
