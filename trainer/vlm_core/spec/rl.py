"""The `rl` stage's own settings (`stages[].rl`): PPO or GRPO, sampling, rewards, KL to the reference.

The stage reads prompts in the `conversation` format: the last assistant turn is the reference answer (what
the verifiers compare with) and is dropped from the prompt; everything before it (the image, the question,
earlier turns) is the prompt the policy answers. The reference policy (KL) is the stage's starting weights:
the previous training stage's final/ (for LoRA: the policy with its adapter disabled).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from vlm_core.spec.base import ContentOf, NoEffect, Strict

Algorithm = Literal["ppo", "grpo"]
Verifier = Literal["exact", "regex", "python"]


class RLRewardSpec(Strict):
    """Where a response's scalar reward comes from: a `reward` stage's model, or a named verifier."""

    from_stage: str | None = Field(
        None, description="Name of an earlier stage of this job whose final/ is a reward model (image, question, "
        "response -> scalar); the planner resolves it to `model`.",
    )
    model: Annotated[str | None, NoEffect("a location"), ContentOf("checkpoint")] = Field(
        None, description="URI of a reward model's final/ (set by the planner from fromStage; or given directly).",
    )
    verifier: Verifier | None = Field(
        None, description="exact: 1 if the normalised response equals the normalised reference answer (lower case, "
        "punctuation and extra spaces dropped), else 0; regex: 1 if `pattern` matches the response (re.search), "
        "else 0; python: `entryPoint` is called.",
    )
    pattern: str | None = Field(None, max_length=1000, description="The regular expression of verifier: regex.")
    entry_point: str | None = Field(
        None, max_length=300, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="verifier: python: 'module:function', called as function(responses: list[str], references: "
        "list[str], prompts: list[str]) -> list[float] (one reward per response; importable in the trainer image).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RLRewardSpec:
        sources = [n for n, v in (("fromStage", self.from_stage), ("model", self.model), ("verifier", self.verifier))
                   if v is not None]
        if self.from_stage is not None and self.model is not None:
            sources.remove("model")  # the planner's resolution keeps both
        if len(sources) != 1:
            raise ValueError("rl.reward: set exactly one of fromStage (a reward stage), model or verifier "
                             f"(exact, regex or python), got {sources or 'none'}")
        if self.verifier == "regex" and not self.pattern:
            raise ValueError("rl.reward.pattern: verifier 'regex' needs a pattern")
        if self.verifier == "python" and not self.entry_point:
            raise ValueError("rl.reward.entryPoint: verifier 'python' needs 'module:function'")
        if self.pattern is not None and self.verifier != "regex":
            raise ValueError("rl.reward.pattern: only with verifier 'regex'")
        if self.entry_point is not None and self.verifier != "python":
            raise ValueError("rl.reward.entryPoint: only with verifier 'python'")
        if self.pattern is not None:
            import re

            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"rl.reward.pattern: not a regular expression ({err})") from None
        return self


class RLSpec(Strict):
    """RL on generated answers: PPO (value head, GAE, KL in the reward) or GRPO (group-normalised advantages)."""

    algorithm: Algorithm = Field("grpo", description="ppo or grpo.")
    reward: RLRewardSpec = Field(
        default_factory=lambda: RLRewardSpec(verifier="exact"),
        description="Reward source: a reward stage's model (fromStage) or a verifier (default: exact match).",
    )
    group_size: int = Field(4, ge=1, le=256, description="Responses sampled per prompt (GRPO's G; PPO uses it "
                            "too: each is one rollout). GRPO needs at least 2.")
    max_new_tokens: int = Field(32, gt=0, le=8192, description="Most tokens generated per response.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest token set of this mass.")
    beta: float = Field(0.04, ge=0, le=100, description="KL coefficient to the reference (GRPO: the k3 term in the "
                        "loss, as TRL; PPO: a per-token penalty in the reward, as LLaVA-RLHF).")
    clip_range: float = Field(0.2, gt=0, le=10, description="epsilon of the clipped ratio, [1-eps, 1+eps].")
    iterations: int = Field(1, ge=1, le=64, description="Optimizer steps per batch of rollouts (TRL's "
                            "num_iterations, PPO's epochs); checkpoint.everySteps must be a multiple of it.")
    # PPO only
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount of GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: lambda of GAE.")
    value_clip_range: float = Field(0.2, gt=0, le=100, description="PPO: clip of the value update around the "
                                    "rollout's values.")
    value_coef: float = Field(0.1, ge=0, le=100, description="PPO: weight of the value loss.")
    value_lr: float = Field(1e-3, gt=0, le=1, description="PPO: learning rate of the value head (its own AdamW).")

    @model_validator(mode="after")
    def _group(self) -> RLSpec:
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError(f"rl.groupSize: grpo needs at least 2 responses per prompt, got {self.group_size}")
        return self
