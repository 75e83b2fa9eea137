# shellcheck shell=bash
# Shared by the launch/ scripts (sourced, not run).

# default_nproc: prints the number of GPUs nvidia-smi lists, or 1 without any.
default_nproc() {
  local num_gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    num_gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  if ((num_gpus > 0)); then echo "$num_gpus"; else echo 1; fi
}

# run_module MODULE ARGS...: runs `python -m MODULE` under torchrun on this
# machine with NPROC processes (default: default_nproc), `--config $CONFIG`
# first when CONFIG is set, then ARGS (so they win over the file).
run_module() {
  local module="$1"
  shift
  local config_flags=()
  if [[ -n "${CONFIG:-}" ]]; then
    config_flags=(--config "$CONFIG")
  fi
  exec torchrun --standalone --nproc-per-node="${NPROC:-$(default_nproc)}" \
    -m "$module" "${config_flags[@]}" "$@"
}
