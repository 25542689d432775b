#!/usr/bin/env bash
# The GPU row in one prepared run, for a node that has torch but neither Ray nor pydantic, and no
# network (the workplace's lent GPU machines). From the repo root there:
#   bash benchmarks/gpu.sh "$OUT"
# Needs, carried beside the code (both git-ignored):
#   .whl/      pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions wheels
#              for its Python 3.12 (docs/benchmarks.md, "Measuring on a GPU", has the pip line)
#   .omniglot/ images_background.zip and images_evaluation.zip (copied from ../shared/data/omniglot)
# Writes adaptation-*.json and the log to the folder given (default: ./gpu-results).
set -euo pipefail
out="${1:-gpu-results}"
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
export METAPLATFORM_OMNIGLOT="$PWD/.omniglot" METAPLATFORM_CACHE=/tmp/metaplatform-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# No wheel installed here, so no .pth start-up hook: import it by hand before platform.* (README).
harness() {
  python3 -c "import metaplatform_hook, runpy, sys; sys.argv = ['adaptation', *sys.argv[1:]]; \
runpy.run_module('benchmarks.adaptation', run_name='__main__')" --device cuda "$@"
}
{
  harness --settings maml-1,maml-5,fomaml-1,anil-1 --json "$out/adaptation-chunk4.json"
  for chunk in 8 32; do
    harness --settings maml-1,maml-5 --rounds 3 --json "$out/adaptation-chunk$chunk.json" "optim.chunk=$chunk"
  done
  # ResNet-12 at 84x84, 5-way 1-shot, 15 queries: tasks/s and peak memory per task, plain, with
  # recomputed blocks (model.recompute) and in bf16 (model.precision).
  resnet12() { python3 -c "import metaplatform_hook, runpy; runpy.run_module('benchmarks.resnet12', run_name='__main__', alter_sys=True)" --device cuda --seconds 20 "$@"; }
  resnet12 --json "$out/resnet12.json"
  resnet12 --recompute --json "$out/resnet12-recompute.json"
  resnet12 --precision bf16 --json "$out/resnet12-bf16.json"
  resnet12 --precision bf16 --recompute --json "$out/resnet12-bf16-recompute.json"
} 2>&1 | tee "$out/log.txt"
