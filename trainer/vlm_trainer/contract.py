"""The operator-trainer contract: names both sides agree on (env, paths, files, labels, ports).

Torch-free and Kubernetes-free; imported by both packages and tested from both sides.
"""

# The trainer entry point, as torchrun runs it: `torchrun ... -m vlm_trainer --config <uri>`.
TRAINER_MODULE = "vlm_trainer"
CONFIG_ENV = "VLM_TRAINER_CONFIG"  # URI/path of the resolved TrainerConfig JSON
CONFIG_MOUNT_DIR = "/etc/vlm-trainer"  # where the stage ConfigMap is mounted in pods
CONFIG_FILE = "config.json"

# Storage layout under <storage.uri>/<job>/<stage>/
FINAL_DIR = "final"  # HF-format weights, published when the stage ends (committed, manifest last)
CHECKPOINT_PREFIX = "checkpoint-"  # resumable checkpoints: checkpoint-<step>/
PROGRESS_FILE = "progress.json"  # step, total, tokens/s, ETA; written periodically by rank 0
EVAL_FILE = "eval.json"  # end-of-stage metrics (loss, DPO reward accuracy/margin), written by rank 0
REPORT_FILE = "report.json"  # per job, under <storage.uri>/<job>/

# Prometheus endpoint per trainer process: port METRICS_PORT + local rank.
METRICS_PORT = 9400
METRICS_PORT_ENV = "VLM_METRICS_PORT"

# Labels on every object the operator creates.
LABEL_JOB = "training.vlm.dev/job"
LABEL_STAGE = "training.vlm.dev/stage"
LABEL_STAGE_INDEX = "training.vlm.dev/stage-index"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "vlm-operator"

RDZV_PORT = 29400
