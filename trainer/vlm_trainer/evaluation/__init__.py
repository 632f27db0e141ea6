"""Evaluation by generation: greedy answers on held-out shards (`generate`), scored by the field's standard
metrics (`scoring`). The eval stage kind (vlm_trainer.stages.eval) runs it."""
