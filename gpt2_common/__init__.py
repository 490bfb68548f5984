"""What both trainers share: config, tokenizer, data, weight layout, FLOPs, metrics. Imports neither framework."""
