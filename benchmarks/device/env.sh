# Source on the GPU machine after `setup.sh receive` said READY (bash; from any directory):
#   source .device/partN/env.sh    (or benchmarks/device/env.sh once this folder is in the checkout)
# Sets PYTHONPATH=/tmp/site:<repo>, PATH=/tmp/site/bin:..., LSA_MODEL_DIR=/tmp/smollm2,
# LSA_MODEL=<the SmolLM2 GGUF>, LSA_HAYSTACK=/tmp/haystack, PYTHONUNBUFFERED=1, RAY_USAGE_STATS_ENABLED=0.
eval "$(bash "$(dirname "${BASH_SOURCE[0]}")/setup.sh" env)"
