#!/usr/bin/env bash
# Thin launcher: set up .venv once, then hand over to the Python scripts.
#   ./run.sh demo                  set up, profile the machine, quick GRU run, print suggestions
#   ./run.sh test                  set up, run the test suite
#   ./run.sh start gru [flags]     train in the background (survives closing the terminal; also
#                                  classifier, asr, lm, sft; --nproc N: N processes under torchrun)
#   ./run.sh status | monitor [RUN] | stop [RUN]   (--runs DIR after the command: another runs folder)
#   ./run.sh profile | config | optimize | plan TRAINER | watch [flags]   memory_optimizer.py commands
#   ./run.sh gru [flags]           train in the foreground (python train_gru.py [flags]; also
#                                  classifier, asr, lm, sft)
#   ./run.sh asr-memory-optimized --train-manifest M.jsonl   the seed's T4 recipe for train_asr.py
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=.venv/Scripts/python.exe  # Git Bash on Windows

setup() {
  if [ ! -d .venv ]; then
    echo "creating .venv (one time)"
    python3 -m venv .venv
    PY=.venv/bin/python; [ -x "$PY" ] || PY=.venv/Scripts/python.exe
  fi
  # reinstall only when a requirements file changed since the last install
  local stamp=.venv/.installed-$1
  if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ]; then
    "$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    "$PY" -m pip install -q -r requirements.txt
    [ "$1" = dev ] && "$PY" -m pip install -q -r requirements-dev.txt
    touch "$stamp"
  fi
}

cmd=${1:-help}; [ $# -gt 0 ] && shift
case "$cmd" in
  demo)
    setup run
    "$PY" memory_optimizer.py profile
    "$PY" memory_optimizer.py config
    "$PY" train_gru.py --quick --out runs/demo "$@"
    "$PY" train_gru.py --suggest "red run" --category fashion --beam 5 --out runs/demo
    "$PY" train_gru.py --suggest "samsung " --category electronics --beam 5 --out runs/demo ;;
  test)  # one pytest worker per core, one torch thread and one test file at a time each (2 cores: ~9 min)
    setup dev
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" "$PY" -m pytest -q -n auto --dist loadfile --no-loadscope-reorder -o tmp_path_retention_policy=failed tests "$@" ;;
  start|status|stop)
    setup run
    "$PY" memory_optimizer.py "$cmd" "$@" ;;
  monitor)  # one run until it ends: RUN, else the newest
    setup run
    "$PY" memory_optimizer.py monitor --latest "$@" ;;
  profile|config|optimize|plan)
    setup run
    "$PY" memory_optimizer.py "$cmd" "$@" ;;
  watch)
    setup run
    "$PY" memory_optimizer.py monitor "$@" ;;
  asr-memory-optimized)  # the seed's run_training_memory_optimized.sh, flag for flag
    setup run
    "$PY" train_asr.py --batch_size 2 --gradient_accumulation_steps 4 --mixed_precision \
      --d_model 192 --encoder_layers 8 --decoder_layers 4 --empty-cache-every 50 "$@" ;;
  gru|classifier|asr|lm|sft)
    setup run
    "$PY" "train_$cmd.py" "$@" ;;
  help|-h|--help)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    echo "error: unknown command \"$cmd\"; ./run.sh help lists them" >&2
    exit 2 ;;
esac
