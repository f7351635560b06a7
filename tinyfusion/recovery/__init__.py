"""Recovery of pruned models: fine-tuning and Masked knowledge distillation."""
