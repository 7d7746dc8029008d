# Helpers shared by launch/tpu_vm.sh and launch/tpu_worker.sh (sourced, not run).
# The sourcing script sets dry_run (1: print commands instead of running them).

# Shell words for "$@": plain when safe, else in single quotes (readable, and what the
# workers' shell parses back into the same words).
quote() {
  local out=() w sq="'" esc="'\\''"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:@,+%^-]+$ ]]; then
      out+=("$w")
    else
      out+=("'${w//$sq/$esc}'")
    fi
  done
  echo "${out[*]}"
}

# Runs "$@", or prints it under --dry-run.
x() {
  if [[ "${dry_run:-0}" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}
