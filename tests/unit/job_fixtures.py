"""A valid three-stage job document shared by the spec and planner tests."""

GOOD = {
    "apiVersion": "training.vlm.dev/v1alpha1",
    "kind": "VLMTrainingJob",
    "metadata": {"name": "demo"},
    "spec": {
        "model": {"visionEncoder": "/m/vision", "languageModel": "/m/lm", "imageSize": 32},
        "storage": {"uri": "file:///tmp/store"},
        "stages": [
            {"name": "align", "type": "align", "data": {"shards": ["a-{0..1}.tar"], "format": "caption"}, "maxSteps": 10},
            {"name": "instruct", "type": "instruct", "data": {"shards": ["b.tar"], "format": "conversation"}, "maxSteps": 10},
            {"name": "dpo", "type": "dpo", "data": {"shards": ["c.tar"], "format": "preference"}, "maxSteps": 5},
        ],
    },
}
