"""What the sft and grpo stages share: records, model and LoRA, callbacks, checkpoints, launcher, rewards."""
