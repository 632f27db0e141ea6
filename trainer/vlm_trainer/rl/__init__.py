"""The `rl` stage kind's parts (vlm_trainer.stages.rl runs them): the losses and advantage estimators (`losses`),
prompts and rollouts (`rollout`), rewards from verifiers or a reward model (`rewards`) and PPO's value head
(`value`)."""
