"""PPO against the reward model with a KL penalty to the SFT policy (InstructGPT step 3)."""
