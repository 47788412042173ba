#!/usr/bin/env bash
# The whole job end to end on the built-in default: a synthetic bucket with the real Open Images
# layout, served by a local S3 endpoint (moto) on loopback; shard it, train Mask R-CNN on the CPU
# for a fixed number of steps (train/config.py's DEMO_DEFAULTS: the same figure on every
# machine, only the time differs), evaluate, run `oistream predict` on the validation shards and
# draw predictions. Everything lands under demo/.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO:-demo}
TRAIN_IMAGES=${TRAIN_IMAGES:-96}
CLASSES=(Person Car "Traffic light" "Traffic sign")
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

rm -rf "$DEMO"
mkdir -p "$DEMO"
echo "== 1. synthetic bucket, served as S3 on 127.0.0.1:$PORT"
oistream fake-bucket "$DEMO/bucket" --images "$TRAIN_IMAGES" --serve --port "$PORT" >"$DEMO/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
export FSSPEC_S3_ENDPOINT_URL="http://127.0.0.1:$PORT"
python - "$FSSPEC_S3_ENDPOINT_URL" "$SERVER" <<'PY'
# Wait until the server answers (it first writes the bucket, then uploads it).
import os, sys, time, urllib.request
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        urllib.request.urlopen(url + "/openimages/v5/classes-segmentation.txt", timeout=2).read()
        sys.exit(0)
    except Exception:
        try:
            os.kill(pid, 0)
        except OSError:
            sys.exit("the fake-bucket server exited; see demo/server.log")
        time.sleep(0.5)
sys.exit("the fake-bucket server did not come up in 5 minutes; see demo/server.log")
PY
cat "$DEMO/server.log"

echo "== 2. classes"
oistream classes traffic --metadata s3://openimages

echo "== 3. shard train and validation straight from the S3 endpoint"
for split in train validation; do
  oistream shard --classes "${CLASSES[@]}" --split "$split" --metadata s3://openimages \
    --out "$DEMO/shards/$split" --samples-per-shard 32
done
oistream inspect "$DEMO/shards/train"
oistream show "$DEMO/shards/validation" --out "$DEMO/ground-truth.png"

echo "== 4. train Mask R-CNN on the CPU (--demo: a fixed number of steps), then evaluate"
TIMEFORMAT="training took %0R s (wall), %0U s user + %0S s system CPU"
time python -m train --train "$DEMO/shards/train" --val "$DEMO/shards/validation" --out "$DEMO/run" \
  --device cpu --demo
python - "$DEMO/run/eval.json" <<'PY'
import json, os, sys
result = json.load(open(sys.argv[1]))
oi = result["open_images"]
figure = oi.get("mAP@0.5", oi.get("map"))
print(f"mask mAP@0.5 {figure:.3f} on {result['images']} validation images after "
      f"{result['step']} steps (load average {os.getloadavg()[0]:.2f})")
PY

echo "== 5. oistream predict on the validation shards"
CHECKPOINT=$(ls "$DEMO"/run/checkpoints/step-*.pt | tail -n 1)
oistream predict --checkpoint "$CHECKPOINT" --input "$DEMO/shards/validation" --out "$DEMO/predict" \
  --pictures 4 --device cpu

echo "== done"
echo "bucket:       $DEMO/bucket"
echo "shards:       $DEMO/shards/{train,validation} (manifest.json in each)"
echo "ground truth: $DEMO/ground-truth.png"
echo "training:     $DEMO/run (metrics.jsonl, eval.json, checkpoints)"
echo "predictions:  $DEMO/run/predictions/ (pictures at the evaluation)"
echo "predict:      $DEMO/predict (json/, predictions.csv, pictures/)"
