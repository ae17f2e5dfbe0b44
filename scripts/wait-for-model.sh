#!/usr/bin/env bash
# Wait until an OpenAI-compatible server lists a model: poll URL (.../v1/models) until it answers 200
# with MODEL among the ids, or give up after TIMEOUT seconds. Prints what it waits for and the seconds
# elapsed, so a long first start (model download, weight loading) is visibly alive.
#   usage: wait-for-model.sh URL MODEL [TIMEOUT_S] [INTERVAL_S]
#   exit:  0 serving, 1 timed out, 2 usage
set -euo pipefail

if (($# < 2)); then
  echo "usage: $0 URL MODEL [TIMEOUT_S] [INTERVAL_S]" >&2
  exit 2
fi
url=$1
model=$2
timeout_s=${3:-1800}
interval_s=${4:-5}
if ! [[ $timeout_s =~ ^[0-9]+$ && $interval_s =~ ^[0-9]+([.][0-9]+)?$ ]]; then
  echo "wait-for-model: TIMEOUT_S must be whole seconds and INTERVAL_S a number: got '$timeout_s' '$interval_s'" >&2
  exit 2
fi

echo "wait-for-model: waiting up to ${timeout_s}s for model '$model' at $url"
start=$SECONDS
last_report=-1
while true; do
  elapsed=$((SECONDS - start))
  body=$(curl -fsS --max-time 5 "$url" 2>&1) && code=0 || code=$?
  if ((code == 0)) && [[ $body == *"\"id\":\"$model\""* || $body == *"\"id\": \"$model\""* ]]; then
    echo "wait-for-model: '$model' is served after ${elapsed}s"
    exit 0
  fi
  if ((elapsed >= timeout_s)); then
    echo "wait-for-model: gave up after ${elapsed}s; last answer: ${body:0:300}" >&2
    exit 1
  fi
  # One line every 30 s: what is being waited for and what the server said.
  if ((last_report < 0 || elapsed - last_report >= 30)); then
    if ((code == 0)); then
      state="the server answers, but does not list '$model' yet: ${body:0:200}"
    else
      state="no answer yet (${body:0:120})"
    fi
    echo "wait-for-model: ${elapsed}s: $state"
    last_report=$elapsed
  fi
  sleep "$interval_s"
done
